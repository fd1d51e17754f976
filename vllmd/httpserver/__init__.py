"""vllmd's own HTTP/1.1 server (asyncio protocols over httptools' parser) for plain ASGI apps.

It knows nothing of models: the gateway, the metrics endpoints and the tests' proxies run on it.
"""
