"""The supervisor: the commands the gateway and the control API call (`commands.Supervisor`),
admission (queues of requests waiting for a model), reload, and the views others read."""
