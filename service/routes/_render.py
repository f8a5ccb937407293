"""How routes answer a wire model: serialised once by pydantic into the response body.

Routes return these responses rather than the models themselves, so FastAPI neither validates nor
serialises a model a second time (the ``response_model`` of each route still documents it).
"""

from typing import Any

from fastapi.responses import Response


def json_response(model: Any, status_code: int = 200) -> Response:
    """The JSON response of one pydantic model."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def json_list_response(items: list[Any]) -> Response:
    """The JSON array of pydantic models."""
    body = "[" + ",".join(i.model_dump_json() for i in items) + "]"
    return Response(body, media_type="application/json")
