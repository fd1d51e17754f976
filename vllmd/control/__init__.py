"""The control API on its Unix socket: the verbs vllmctl calls, their errors and queries, the
listener (peer credentials, mode, group) and its HTTP/1.1 connections."""
