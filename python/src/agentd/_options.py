"""Building EXEC from ``subprocess``-shaped arguments, and the result types (shared by both clients)."""

from __future__ import annotations

import os
import subprocess
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from . import messages as m
from .protocol import RLIMIT_RESOURCES

__all__ = ["Args", "Env", "Rlimits", "build_exec", "CompletedProcess", "OutputChunk", "returncode_of"]

#: A command: a sequence of arguments (argv[0] first), or one program name.
Args = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]
#: Environment additions: a mapping, or ``KEY=VALUE`` strings.
Env = Union[Mapping[str, str], Sequence[str]]
#: Resource limits: ``{"nofile": 1024, "core": (0, RLIM_INFINITY)}``, or Rlimit records.
Rlimits = Union[Mapping[str, Union[int, Tuple[int, int]]], Iterable[m.Rlimit]]

#: The default output window of a session: this much output at most waits in Python per session.
DEFAULT_OUTPUT_WINDOW = 4 << 20


def _argv(args: Args, shell: bool) -> list[str]:
    if shell:
        if not isinstance(args, (str, os.PathLike)):
            raise TypeError("with shell=True, give the command as one string")
        return ["/bin/sh", "-c", os.fspath(args)]
    if isinstance(args, (str, os.PathLike)):
        argv = [os.fspath(args)]
    else:
        argv = [os.fspath(a) for a in args]
    if not argv:
        raise ValueError("the command is empty: give at least the program")
    for a in argv:
        if not isinstance(a, str):
            raise TypeError(f"arguments must be str (or os.PathLike of str), not {type(a).__name__}")
    return argv


def _env(env: Optional[Env]) -> list[str]:
    if env is None:
        return []
    if isinstance(env, Mapping):
        return [f"{k}={v}" for k, v in env.items()]
    return [str(e) for e in env]


def _rlimits(rlimits: Optional[Rlimits]) -> list[m.Rlimit]:
    if rlimits is None:
        return []
    if isinstance(rlimits, Mapping):
        out = []
        for name, value in rlimits.items():
            if name not in RLIMIT_RESOURCES:
                raise ValueError(f"unknown rlimit {name!r}; use one of {' '.join(sorted(RLIMIT_RESOURCES))}")
            soft, hard = (value, value) if isinstance(value, int) else value
            out.append(m.Rlimit(resource=name, soft=soft, hard=hard))
        return out
    return list(rlimits)


def build_exec(
    args: Args,
    *,
    shell: bool = False,
    env: Optional[Env] = None,
    clear_env: bool = False,
    cwd: Optional[Union[str, "os.PathLike[str]"]] = None,
    user: Union[str, int, None] = None,
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
    rlimits: Optional[Rlimits] = None,
    stdin: bool = True,
    output_window: int = DEFAULT_OUTPUT_WINDOW,
    linger_ms: int = 100,
    no_new_privs: bool = False,
    tag: Optional[str] = None,
    replay_bytes: Optional[int] = None,
    deadline: Optional[float] = None,
    kill_grace: float = 1.0,
    memory_max: Optional[int] = None,
    pids_max: Optional[int] = None,
    cpu_max: Optional[str] = None,
    detach: bool = False,
) -> Tuple[list[str], m.Exec]:
    """The argv and the EXEC message for these arguments (validated: ranges are checked on encoding)."""
    argv = _argv(args, shell)
    msg = m.Exec(
        cmd=argv[0],
        args=argv[1:],
        env=_env(env),
        clear_env=clear_env,
        cwd=None if cwd is None else os.fspath(cwd),
        user=None if user is None else str(user),
        tty=tty,
        rows=rows,
        cols=cols,
        rlimits=_rlimits(rlimits),
        stdin=stdin,
        output_window=output_window,
        linger_ms=linger_ms,
        no_new_privs=no_new_privs,
        tag=tag,
        replay_bytes=replay_bytes,
        detach=detach,
        timeout_ms=0 if deadline is None else max(1, int(deadline * 1000)),
        kill_grace_ms=max(0, int(kill_grace * 1000)),
        memory_max=memory_max,
        pids_max=pids_max,
        cpu_max=cpu_max,
    )
    msg.encode_payload()  # fail here, in the caller, on a value out of range
    return argv, msg


def returncode_of(exited: m.Exited) -> int:
    """``subprocess``'s view of an exit: the code, or minus the signal number."""
    if exited.code is not None:
        return exited.code
    if exited.signal is not None:
        return -exited.signal
    return exited.status


class OutputChunk(NamedTuple):
    """A piece of output as it arrived: ``fd`` is 1 (stdout) or 2 (stderr)."""

    fd: int
    data: bytes

    @property
    def stream(self) -> str:
        """``"stdout"`` or ``"stderr"``."""
        return "stdout" if self.fd == 1 else "stderr"


class CompletedProcess(subprocess.CompletedProcess):  # type: ignore[type-arg]
    """What :meth:`Client.run` returns: :class:`subprocess.CompletedProcess` plus the agent's facts.

    ``returncode`` is the exit code, or minus the signal (as ``subprocess``);
    ``signal`` is the signal that killed it (or None), ``status`` the
    shell's view (code, or 128 + signal), ``pid`` its pid in the guest.
    """

    def __init__(
        self,
        args: Any,
        exited: m.Exited,
        stdout: Any,
        stderr: Any,
        *,
        pid: Optional[int],
    ) -> None:
        super().__init__(args, returncode_of(exited), stdout, stderr)
        self.signal: Optional[int] = exited.signal
        self.status: int = exited.status
        self.core_dumped: bool = exited.core_dumped
        self.output_dropped: Optional[int] = exited.output_dropped
        #: The agent's deadline (``deadline=``) ended it.
        self.timed_out: bool = exited.timed_out
        #: The OOM killer killed a process of the session (its cgroup's ``memory.events``).
        self.oom_killed: bool = exited.oom_killed
        self.pid = pid
        self.exited = exited

    def check_returncode(self) -> None:
        """Raise :class:`~agentd.CalledProcessError` if the status is not 0."""
        from .errors import CalledProcessError

        if self.returncode:
            raise CalledProcessError(
                self.returncode, self.args, self.stdout, self.stderr, signal=self.signal, status=self.status
            )

    def __repr__(self) -> str:
        parts = [f"args={self.args!r}", f"returncode={self.returncode!r}"]
        if self.signal is not None:
            parts.append(f"signal={self.signal}")
        if self.stdout is not None:
            parts.append(f"stdout={self.stdout!r}")
        if self.stderr is not None:
            parts.append(f"stderr={self.stderr!r}")
        return f"CompletedProcess({', '.join(parts)})"


def decode_text(data: Optional[bytes], text: bool, encoding: Optional[str], errors: Optional[str]) -> Any:
    """``data`` as str when text mode is on (``subprocess``'s rules: text, encoding or errors)."""
    if data is None or not (text or encoding or errors):
        return data
    return data.decode(encoding or "utf-8", errors or "strict")


def encode_text(data: Any, text: bool, encoding: Optional[str], errors: Optional[str]) -> Optional[m.Buffer]:
    """``input`` as bytes (a str in text mode is encoded)."""
    if data is None:
        return None
    if isinstance(data, str):
        if not (text or encoding or errors):
            raise TypeError("input is a str: pass bytes, or text=True")
        return data.encode(encoding or "utf-8", errors or "strict")
    return data  # type: ignore[no-any-return]
