"""opd.server: the teacher scoring service (FastAPI app, batcher, backends, scoring math).

Entry points: `opd serve` (opd.server.serve) and `uvicorn opd.server.app:create_app --factory`.
"""
