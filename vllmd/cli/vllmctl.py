"""`vllmctl`: the operator's command line for a running vllmd, over its control socket.

Exit codes (docs/design.md "Commands"): 0 done, 1 refused or failed, 2 usage error (argparse's own),
3 daemon unreachable. Everything below `main` raises `CtlError` (`Unreachable` for exit 3);
httpx's transport errors are translated into it at one boundary (`Control._errors`), and only
`main` turns it into a message and an exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from vllmd import __version__
from vllmd.cli import render
from vllmd.cli.client import (
    DEFAULT_SOCKET,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    STOPPING,
    Control,
    CtlError,
    Unreachable,
    chosen_socket,
    socket_for,
    unreachable_message,
)
from vllmd.units import parse_duration

__all__ = ["Control", "CtlError", "main", "unreachable_message"]
DEFAULT_CONFIG = Path("/etc/vllmd/vllmd.toml")
VERBS = {
    "load": "start (or wake) a model and keep it loaded on purpose",
    "unload": "stop a model",
    "sleep": "put a model to sleep (frees GPU memory, keeps the process)",
    "wake": "wake a sleeping model (a stopped one is loaded)",
    "restart": "restart a model's engine",
    "pin": "never evict a model (a stopped one is pinned without loading)",
    "unpin": "let a model be evicted again",
}

# --- commands ----------------------------------------------------------------------------------


def show(args: argparse.Namespace, response: httpx.Response, human: Callable[[Any], str]) -> int:
    """The body verbatim with --json, else `human(body)`."""
    text = response.text if args.json else human(response.json())
    if text:
        print(text)
    return EXIT_OK


def follow(
    args: argparse.Namespace,
    ctl: Control,
    path: str,
    params: dict[str, str],
    human: Callable[[Any], str],
) -> int:
    """Prints a stream as it comes until the operator presses Ctrl-C (exit 0). The server ends
    a follow only when it stops: that is a failure (exit 1), however the stream ends."""
    params["follow"] = "1"
    try:
        with ctl.stream(path, params) as lines:
            for line in lines:
                if line:
                    print(line if args.json else human(json.loads(line)), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK  # the operator's way to end a follow: not a failure
    raise CtlError(f"vllmd at {ctl.socket} ended the stream ({STOPPING})")


def cmd_status(args: argparse.Namespace, ctl: Control) -> int:
    return show(args, ctl.get("/v1/status"), lambda body: "\n".join(render.status_lines(body)))


def cmd_ps(args: argparse.Namespace, ctl: Control) -> int:
    response = ctl.get("/v1/models")
    if args.names:  # for completion and scripts: names only, whatever --json says
        for model in response.json()["models"]:
            print(model["name"])
        return EXIT_OK
    return show(args, response, lambda body: render.ps_table(body["models"], time.time()))


def cmd_verb(args: argparse.Namespace, ctl: Control) -> int:
    params = {}
    if args.no_wait:
        params["wait"] = "false"
    if args.timeout is not None:
        params["timeout"] = f"{args.timeout:g}"
    response = ctl.post(f"{model_path(ctl, args.name)}/{args.command}", params)
    if response.status_code == 202 and not args.json:
        line = render.model_line(response.json())
        print(f"{line}; {args.command} accepted: `vllmctl ps` shows how it ends")
        return EXIT_OK
    return show(args, response, render.model_line)


def cmd_logs(args: argparse.Namespace, ctl: Control) -> int:
    path = f"{model_path(ctl, args.name)}/logs"
    params = {} if args.lines is None else {"tail": str(args.lines)}
    if args.follow:
        return follow(args, ctl, path, params, lambda item: str(item["line"]))
    return show(args, ctl.get(path, params), lambda body: "\n".join(body["lines"]))


def cmd_reload(args: argparse.Namespace, ctl: Control) -> int:
    return show(args, ctl.post("/v1/reload"), render.reload_summary)


def cmd_alerts(args: argparse.Namespace, ctl: Control) -> int:
    return show(args, ctl.get("/v1/alerts"), lambda body: render.alerts_table(body["alerts"]))


def cmd_devices(args: argparse.Namespace, ctl: Control) -> int:
    return show(args, ctl.get("/v1/devices"), lambda body: render.devices_table(body["devices"]))


def cmd_events(args: argparse.Namespace, ctl: Control) -> int:
    params = {}
    if args.since is not None:
        params["since"] = since_param(args.since, datetime.now().astimezone())
    if args.limit is not None:
        params["limit"] = str(args.limit)
    if args.follow:
        return follow(args, ctl, "/v1/events", params, render.event_line)
    return show(
        args,
        ctl.get("/v1/events", params),
        lambda body: "\n".join(render.event_line(e) for e in body["events"]),
    )


def cmd_doctor(args: argparse.Namespace, ctl: Control) -> int:
    from vllmd.cli import doctor  # loads the config machinery: only this verb needs it

    status: dict[str, Any] | None = None
    problem = None
    try:
        status = ctl.get("/v1/status").json()
    except Unreachable as exc:
        problem = exc.message
    reported = status.get("config_path") if status else None
    # An explicit --config wins (checking a new file before a reload); then the daemon's own.
    path = args.config or (Path(reported) if reported else DEFAULT_CONFIG)
    checks = doctor.examine(path, ctl.socket, status, problem)
    if args.json:
        print(json.dumps({"checks": [c.as_dict() for c in checks]}))
    else:
        print(doctor.report(checks))
    return EXIT_FAILED if doctor.failed(checks) else EXIT_OK


def model_path(ctl: Control, name: str) -> str:
    """The API path of a model. An alias with "/" (an HF id) cannot be a path segment even
    quoted (the server decodes before it splits), so it is looked up by its canonical name."""
    if "/" in name:
        for model in ctl.get("/v1/models").json()["models"]:
            if name in model.get("aliases", ()):
                name = model["name"]
                break
        else:
            raise CtlError(f"The model `{name}` does not exist.")
    return f"/v1/models/{quote(name, safe='')}"


def since_param(text: str, now: datetime) -> str:
    """`--since` as the API takes it: an event id or RFC 3339 time as given; a time without a
    zone is local; a duration ("10m") means that long ago."""
    if text.isdigit():
        return text
    try:
        return (now - timedelta(seconds=parse_duration(text))).isoformat()
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text  # the server says what is wrong with it
    return (moment if moment.tzinfo else moment.astimezone()).isoformat()


COMMANDS: dict[str, Callable[[argparse.Namespace, Control], int]] = {
    "status": cmd_status,
    "ps": cmd_ps,
    **dict.fromkeys(VERBS, cmd_verb),
    "logs": cmd_logs,
    "devices": cmd_devices,
    "plan": lambda args, ctl: show(args, ctl.get("/v1/plan"), render.plan_text),
    "alerts": cmd_alerts,
    "reload": cmd_reload,
    "events": cmd_events,
    "doctor": cmd_doctor,
}


# --- the command line --------------------------------------------------------------------------


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllmctl", description="Control a running vllmd over its control socket."
    )
    p.add_argument(
        "--socket",
        type=Path,
        help=f"control socket (default: $VLLMD_SOCKET, else for doctor its config's "
        f"daemon.control_socket, else {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help="print the API's response body verbatim")
    p.add_argument("--version", action="version", version=f"vllmctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")
    sub.add_parser("status", help="the daemon, its devices, models by state")
    ps = sub.add_parser("ps", help="the models: state, memory, pid, last use")
    ps.add_argument("--names", action="store_true", help="only the model names, one a line")
    for verb, text in VERBS.items():
        v = sub.add_parser(verb, help=text)
        v.add_argument("name", metavar="NAME")
        v.add_argument("--no-wait", action="store_true", help="return once accepted")
        v.add_argument(
            "--timeout", type=_seconds, metavar="S", help="wait at most S seconds (server bound)"
        )
    logs = sub.add_parser("logs", help="a model's engine output")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-n", "--lines", type=_count, metavar="N", help="the last N lines")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing (Ctrl-C ends)")
    sub.add_parser("devices", help="devices and what each model reserves on them")
    sub.add_parser("plan", help="each model's memory in its parts; which fit together")
    sub.add_parser("alerts", help="the alerts pending or firing")
    sub.add_parser("reload", help="reload the config file (a bad one changes nothing)")
    events = sub.add_parser("events", help="what happened, oldest first")
    events.add_argument(
        "--since", metavar="ID|TIME", help="after event ID, from TIME (RFC 3339) or a duration ago"
    )
    events.add_argument("--limit", type=_count, metavar="N", help="at most N events")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing (Ctrl-C ends)")
    doctor = sub.add_parser("doctor", help="check this host's setup (works with vllmd down)")
    doctor.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"config to check (default: the daemon's, else {DEFAULT_CONFIG})",
    )
    return p


def socket_path(args: argparse.Namespace) -> Path:
    """`--socket`, else $VLLMD_SOCKET, else (doctor) the socket of the config it checks, else
    the default: doctor asks the daemon that its config file describes."""
    configured = None
    if args.command == "doctor" and chosen_socket(args.socket, os.environ) is None:
        from vllmd.cli.doctor import config_socket  # the config machinery: doctor's alone

        configured = config_socket(args.config or DEFAULT_CONFIG)
    return socket_for(args.socket, os.environ, configured)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ctl = Control(socket_path(args))
    try:
        return COMMANDS[args.command](args, ctl)
    except CtlError as exc:
        if args.json and exc.body:
            print(exc.body)
        print(f"vllmctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`vllmctl logs x | head`): say nothing more, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        ctl.close()


if __name__ == "__main__":
    sys.exit(main())
