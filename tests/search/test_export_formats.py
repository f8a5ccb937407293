"""The format registry: :func:`search.export.export_point` dispatches by name to one writer per format
and says what it wrote; an unknown name is refused with the field."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from bitscout.formats import EXPORT_FORMATS, parse_export_format
from search.adapter import ModelAdapter
from search.errors import InvalidInputError
from search.export import ARTIFACT_FILE, WRITERS, export_point, load_artifact
from search.space import BitOption, PrecisionMap
from search.tasks import load_model
from tests.tiny import build_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("formats") / "model", "bert", task="sequence_classification")
    return folder, load_model(folder, "sequence_classification", num_labels=2).model


def test_native_export_point_writes_the_artifact_and_reports_its_groups(tiny, tmp_path):
    folder, model = tiny
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, 8, 16))
    names = [g.name for g in space.groups]
    pmap = PrecisionMap({n: BitOption(4 if i % 3 == 0 else 8 if i % 3 == 1 else 16) for i, n in enumerate(names)})
    report = export_point("Native", model, space, pmap, tmp_path / "out", model_dir=folder)
    assert report.format == "native" and report.path == tmp_path / "out" / ARTIFACT_FILE
    assert ARTIFACT_FILE in report.files and "precision_map.json" in report.files
    assert set(report.quantized) == {n for n, o in pmap.items() if o.bits < 16}
    assert set(report.dense) == set(names) - set(report.quantized)
    with safe_open(report.path, "pt") as f:
        assert f.metadata()["format"] == "bitscout.quant"
    load_artifact(tmp_path / "out", load_model(folder, "sequence_classification", num_labels=2).model)


def test_unknown_format_is_refused_with_the_field(tiny, tmp_path):
    _, model = tiny
    space = ModelAdapter(model).build_space(granularity="layer", bits=(4, 8))
    with pytest.raises(InvalidInputError) as err:
        export_point("onnx", model, space, PrecisionMap({}), tmp_path)
    assert err.value.field == "format" and "native" in err.value.message
    with pytest.raises(ValueError, match="format must be one of"):
        parse_export_format(4)


def test_every_writer_is_a_named_format():
    assert set(WRITERS) <= set(EXPORT_FORMATS) and "native" in WRITERS
