"""`python -m megatron_eslm.pretrain ARGV` as a process forked from a warm server, for the tests that must
kill, stop or signal a whole process (the watchdog, the fault drill, snapshot replicas, exit conditions).

A fresh interpreter spends about 5 CPU-seconds before its first step: torch and the project (2.6 s), then
torch._dynamo, which torch.optim imports when the first optimizer is built (2.3 s). multiprocessing's
forkserver imports them once per test worker; each launch is then a fork of that server: a real process
(its own pid, killable, its exit code or signal, its own stdout and stderr), started in milliseconds. The
server never runs a torch operation, so no thread pool exists to be forked (only the main thread runs).

`Popen` takes the arguments the tests give subprocess.Popen for that command and offers what they use of
it. In the child: the environment given replaces os.environ (read by the project when it runs, not at
import), the working directory, stdout and stderr (files, read back by communicate), torch's thread count
from OMP_NUM_THREADS (OpenMP read the server's at load), then pretrain's main as `-m` would run it.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

PRETRAIN = [sys.executable, "-m", "megatron_eslm.pretrain"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["torch", "torch._dynamo", "megatron_eslm.pretrain"])
    return _context


def _run(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch
    from megatron_eslm import pretrain

    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [pretrain.__file__, *argv]
    pretrain.main(argv)


class Popen:
    """subprocess.Popen(PRETRAIN + argv, cwd=..., env=..., stdout=..., stderr=..., text=...) for pretrain."""

    def __init__(self, command: list[str], cwd: str | None = None, env: dict | None = None, stdout=None, stderr=None,
                 text: bool = False):
        assert command[: len(PRETRAIN)] == PRETRAIN, command
        cwd, env = cwd or os.getcwd(), os.environ if env is None else env
        self._dir = tempfile.mkdtemp(prefix="forked-")
        self._paths = {name: os.devnull if where == subprocess.DEVNULL else os.path.join(self._dir, name)
                       for name, where in (("stdout", stdout), ("stderr", stderr))}
        self._piped = {name: where == subprocess.PIPE for name, where in (("stdout", stdout), ("stderr", stderr))}
        self._text = text
        self._process = _server().Process(target=_run, args=(command[len(PRETRAIN):], dict(env), str(cwd),
                                                             self._paths["stdout"], self._paths["stderr"]))
        self._process.start()
        self.pid = self._process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(PRETRAIN, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple:
        self.wait(timeout)
        outputs = []
        for name in ("stdout", "stderr"):
            data = None
            if self._piped[name]:
                with open(self._paths[name], "rb") as fh:
                    data = fh.read()
                data = data.decode() if self._text else data
            outputs.append(data)
        shutil.rmtree(self._dir, ignore_errors=True)
        return tuple(outputs)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()


def run(command: list[str], cwd: str | None = None, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) for pretrain."""
    proc = Popen(command, cwd, env, subprocess.PIPE, subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
