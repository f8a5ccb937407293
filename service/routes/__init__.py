"""The service's routes: one ``APIRouter`` per resource, composed by :func:`service.app.create_app`.

* :mod:`service.routes.health` — ``/healthz``, ``/readyz``, ``/metrics`` and ``/api/v1/version``;
* :mod:`service.routes.jobs` — submitting, listing, reading and canceling jobs; their events;
* :mod:`service.routes.results` — a job's Pareto front, its points, sensitivity tables, resolve;
* :mod:`service.routes.artifacts` — downloading a point's exported model;
* :mod:`service.routes.uploads` — uploading model archives and data files;
* :mod:`service.routes.web` — the status pages and their static files.

Every route takes what it needs as ``Annotated`` dependencies from :mod:`service.deps`, never
commits (each change is one :class:`~service.store.Store` method, which owns its transaction),
answers wire models from :mod:`bitscout.schemas` and raises :class:`~bitscout.errors.BitscoutError`
for every failure (:mod:`service.errors` renders it). The API's routers carry the prefix
:data:`API_PREFIX` themselves, so each route's path is its full template (what the request
metrics are labelled by).
"""

#: Where the REST API lives.
API_PREFIX = "/api/v1"
