#!/usr/bin/env python3
"""One QMP command to a QEMU monitor socket: tests/vm/qmp.py SOCK COMMAND [ARGS-JSON].

Prints the command's "return" value as JSON on stdout. Exits 1 with QEMU's error
(class and description) on stderr when the command fails, 2 when the monitor cannot
be reached or answers something that is not QMP. Events that arrive before the
answer are skipped. Used by run.sh's restore test (stop, migrate, query-migrate,
query-vm-generation-id, cont, quit).
"""

import json
import socket
import sys


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    args = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(path)
        reader = sock.makefile("r", encoding="utf-8")
        greeting = json.loads(reader.readline())
        if "QMP" not in greeting:
            print(f"qmp.py: {path}: not a QMP greeting: {greeting}", file=sys.stderr)
            return 2

        def call(name, arguments=None):
            msg = {"execute": name}
            if arguments is not None:
                msg["arguments"] = arguments
            sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                line = reader.readline()
                if not line:
                    # `quit` closes the monitor before (or instead of) answering.
                    if name == "quit":
                        return {}
                    raise ConnectionError(f"{path} closed the connection during {name}")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                return reply

        call("qmp_capabilities")
        reply = call(command, args)
    except (OSError, ValueError, ConnectionError) as e:
        print(f"qmp.py: {path}: {command}: {e}", file=sys.stderr)
        return 2
    if "error" in reply:
        err = reply["error"]
        print(f"qmp.py: {command}: {err.get('class')}: {err.get('desc')}", file=sys.stderr)
        return 1
    print(json.dumps(reply.get("return", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
