"""``deltavec serve``: vector, keyword and hybrid search over one target, over HTTP.

``app`` holds the routes, ``snapshot`` what a query answers from and how it is
refreshed, ``keywords`` the BM25 index, ``fusion`` the hybrid ranking, ``auth``
the bearer token, ``server`` the uvicorn runner, ``collector`` what it keeps out
of the garbage collector's full collections. FastAPI, uvicorn and tantivy
are imported only here, so the job and ``deltavec search`` never load them.
"""

from __future__ import annotations

from deltavec.serve.server import RunningServer, ServeOptions, serve, start

__all__ = ["RunningServer", "ServeOptions", "serve", "start"]
