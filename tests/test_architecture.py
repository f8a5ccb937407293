"""What the layout promises across packages: the service's process loads no torch, the error codes
are one set, and the method registries name the same methods."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_process_imports_no_torch(tmp_path: Path) -> None:
    """Everything ``bitscout serve`` loads in its own process (the app, the resolver it injects, the
    dispatcher and its Ray task), and a resolve answered through the app, import neither torch nor
    transformers."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from starlette.testclient import TestClient
        import workers.cli, workers.dispatcher, workers.tasks, workers.cluster
        from service.app import create_app
        from service.settings import Settings
        from service.store import Store
        from workers.resolver import SearchResolver
        settings = Settings(data_dir={str(tmp_path)!r})
        from service import db
        engine = db.make_engine(settings.url)
        db.upgrade(engine)
        engine.dispose()
        app = create_app(settings, resolver=SearchResolver())
        store = Store.from_settings(settings)
        _, secret = store.create_token(name="alice")
        from search.space import BitOption, Group, Member, SearchSpace, space_to_dict
        groups = tuple(Group(n, "layer", (Member(n, (4, 4)),), 0, n, macs_per_token=16) for n in ("a", "b"))
        opts = ((BitOption(2), BitOption(8)),) * 2
        space = {{"space": space_to_dict(SearchSpace(groups, opts)), "cost_model": {{"seq_len": 8}}}}
        resolver = SearchResolver()
        out = resolver.resolve(space=space, sensitivities=[{{"method": "kl", "scores": {{
            "a": {{"2": 1.0, "8": 0.0}}, "b": {{"2": 0.1, "8": 0.0}}}}}}], budget={{"max_avg_bits": 5}}, methods=None)
        with TestClient(app) as client:
            assert client.get("/api/v1/jobs", headers={{"Authorization": "Bearer " + secret}}).status_code == 200
        loaded = sorted(m for m in ("torch", "transformers", "search.pipeline", "search.tasks") if m in sys.modules)
        print(json.dumps({{"loaded": loaded, "map": out["precision_map"]}}))
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    # the resolver answered with the planning core: 'b' is cheap to narrow, 'a' is not
    full = {"group_size": None, "act_bits": None, "tt_rank": None}
    assert out["map"] == {"a": {"bits": 8, "symmetric": True, **full}, "b": {"bits": 2, "symmetric": True, **full}}


def test_search_errors_carry_the_wire_error_codes() -> None:
    from bitscout.errors import ErrorCode
    from search import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SearchError)]
    assert len(classes) >= 7
    for cls in classes:
        assert cls.code in set(ErrorCode), cls
    assert errors.InfeasibleBudgetError.code == ErrorCode.budget_infeasible


def test_one_method_registry_names_the_same_methods_everywhere() -> None:
    from bitscout.methods import OPTIONS, Method, MethodOptionsSpec
    from search import methods

    assert set(OPTIONS) == {m.value for m in Method} == set(methods.REGISTRY) == set(MethodOptionsSpec.model_fields)
    for name, entry in methods.REGISTRY.items():
        impl = entry.load()
        if entry.kind == "sensitivity":
            assert impl.name == name
            assert impl().options == OPTIONS[name]()  # the defaults come from the options model
        else:
            assert callable(impl)


@pytest.mark.parametrize(
    ("method", "raw", "field"),
    [
        ("hessian", {"max_probez": 3}, "method_options.hessian.max_probez"),
        ("hessian", {"min_probes": 8, "max_probes": 4}, "method_options.hessian.max_probes"),
        ("kl", {"replay": 1}, "method_options.kl.replay"),
        ("nsga2", {"storage": "sqlite:///x.db"}, "method_options.nsga2.storage"),
    ],
)
def test_options_are_validated_once_with_the_field_named(method: str, raw: dict, field: str) -> None:
    """The search library refuses bad options with the same field the wire names."""
    from pydantic import ValidationError

    from bitscout.schemas import JobSpec
    from search.errors import InvalidInputError
    from search.methods import parse_options

    with pytest.raises(InvalidInputError) as err:
        parse_options(method, raw)
    assert err.value.field == field
    spec = {"model": {"path": "m"}, "task": "sequence_classification", "data": {"path": "d.jsonl"},
            "methods": [method], "budget": {"max_avg_bits": 4}, "method_options": {method: raw}}
    with pytest.raises(ValidationError) as wire:
        JobSpec.model_validate(spec)
    assert ".".join(map(str, wire.value.errors()[0]["loc"])) == field
