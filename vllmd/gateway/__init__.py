"""The OpenAI-compatible gateway: a request's intake, its route, the model it names, the proxy to
the engine, and the closed set of error codes it answers with."""
