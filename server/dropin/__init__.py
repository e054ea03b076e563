"""Routes in the shapes other trainers already send to vLLM and SGLang teacher servers.

TRL, prime-rl, slime and verl talk to their teacher through vLLM's OpenAI-compatible server (or
SGLang's); these routes answer in those shapes on the same server, port, auth, limits, batcher
and metrics, so a trainer can point at opd unchanged. They only translate shapes: every number
comes from the one scoring path (opd.modeling.scoring through the service). docs/protocol.md
("Drop-in routes") and docs/integrations.md say what each route takes and returns.
"""
