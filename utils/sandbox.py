"""Run untrusted Python (model-written code plus its tests) in a separate, limited process.

Each program runs in its own process with:
- a fresh temporary directory as its working directory (and HOME), deleted afterwards;
- a wall-clock timeout, and rlimits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size
  (RLIMIT_FSIZE), open files, no core dumps, processes (RLIMIT_NPROC);
- stdin on /dev/null, stdout/stderr captured and truncated, a minimal environment, `python -I -S`
  (no site-packages, no user site, no PYTHON* variables: the standard library only);
- its own session and process group, SIGKILLed as a whole when the program ends or times out.

Where `unshare` works (detected once per process by running probes, strongest first), the program also gets
its own network namespace (no interface but a down loopback: no network at all), its own PID and IPC
namespaces (PID 1 is a small supervisor that runs the program as its child, reaps orphans and ends the
namespace at timeout + 5 s even if the evaluator died; when it ends, the kernel kills every process of the run,
also those that left the process group), a fresh /proc showing only the run's processes, and its own mount
namespace in which the whole filesystem is read-only except a private /tmp, /var/tmp and /dev/shm (all three
are its temporary directory). Started as root, the program is switched to an unused uid of its own (one per
concurrent run, so RLIMIT_NPROC counts only that run's processes, which root would ignore) with no
supplementary groups; started as another user, it runs as root of a user namespace and drops every
capability before the program starts. Always no_new_privs: no setuid binary gives privileges back.

Without `unshare` (the fallback, "plain"), the network is disabled inside the Python process only (socket
creation, ctypes and starting other programs raise PermissionError), which deliberate code can undo;
`Sandbox.protection` says which protections are active, and the task's results carry it.
"""
import json
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from utils.errors import UserError

STATUSES = ("passed", "failed", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0        # wall-clock seconds, interpreter start included
    memory_mb: int = 1024        # RLIMIT_AS (address space) in MiB
    cpu_s: Optional[int] = None  # RLIMIT_CPU soft limit (SIGKILL one second later); default ceil(timeout) + 1
    file_mb: int = 16            # RLIMIT_FSIZE: largest file the program may write
    nproc: int = 16              # RLIMIT_NPROC: processes and threads the run may have at once
    nofile: int = 256            # RLIMIT_NOFILE
    output_bytes: int = 4096     # stdout and stderr are each cut to this many bytes

    def cpu_seconds(self):
        return self.cpu_s if self.cpu_s else int(math.ceil(self.timeout)) + 1


@dataclass
class Result:
    status: str          # passed | failed (a test assertion failed) | timeout | error
    kind: str = ""       # AssertionError, NameError, SyntaxError, MemoryError, wall_clock, cpu_time, killed, ...
    message: str = ""    # one short line
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    duration: float = 0.0
    returncode: Optional[int] = None

    def to_dict(self):
        return asdict(self)


# ==== the code that runs first inside the child (trusted; it then runs the program) ====================
# argv[1] is a JSON config. It reads the program, sets up mounts (as root of the namespaces), limits,
# drops privileges, then executes the program and writes one JSON result line to the result fd.
_BOOTSTRAP = r'''
import json, os, sys
cfg = json.loads(sys.argv[1])
RES = cfg["result_fd"]
os.set_inheritable(RES, False)

def report(status, kind="", message=""):
    line = json.dumps({"status": status, "kind": kind, "message": str(message)[:500]}) + "\n"
    try:
        os.write(RES, line.encode("utf-8", "replace"))
    except OSError:
        pass

def setup():
    import resource, signal, ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def ok(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, what + ": " + os.strerror(err))

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    def setattr_(path, set_, clr, recursive):  # mount_setattr(2), Linux >= 5.12
        a = MountAttr(set_, clr, 0, 0)
        ok(libc.syscall(cfg["nr_mount_setattr"], ctypes.c_int(-100), path.encode(),
                        ctypes.c_uint(0x8000 if recursive else 0), ctypes.byref(a), ctypes.c_size_t(ctypes.sizeof(a))),
           "mount_setattr " + path)

    if cfg["private_tmp"]:
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        bound = []
        for target in ("/var/tmp", "/dev/shm", "/tmp"):  # /tmp last: it covers the source path
            if os.path.isdir(target) and not os.path.islink(target):
                ok(libc.mount(cfg["dir"].encode(), target.encode(), None, 4096, None), "bind " + target)  # MS_BIND
                bound.append(target)
        if cfg["readonly"]:
            setattr_("/", 1, 0, True)               # MOUNT_ATTR_RDONLY on every mount
            for target in bound:                      # ... then the private tmp dirs writable again
                setattr_(target, 2 | 4, 1, False)     # + MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        os.chdir("/tmp")
    else:
        os.chdir(cfg["dir"])
    L = cfg["limits"]
    for name, soft, hard in (("RLIMIT_AS", L["as"], L["as"]), ("RLIMIT_CPU", L["cpu"], L["cpu"] + 1),
                             ("RLIMIT_FSIZE", L["fsize"], L["fsize"]), ("RLIMIT_NOFILE", L["nofile"], L["nofile"]),
                             ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", L["nproc"], L["nproc"])):
        resource.setrlimit(getattr(resource, name), (soft, hard))
    ok(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")    # PR_SET_NO_NEW_PRIVS: no setuid binary gives root back
    if cfg["uid"] is not None:                        # started as root: become an unprivileged uid of our own
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError("could not drop root")
    if cfg["drop_caps"]:                              # root of a user namespace: drop every capability
        ok(libc.prctl(28, 0x2f, 0, 0, 0), "securebits")   # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP (locked)
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)                    # PR_CAPBSET_DROP (EINVAL past the last cap)
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        ok(libc.capset(hdr, data), "capset")
        with open("/proc/self/status") as f:
            eff = [l.split()[1] for l in f if l.startswith("CapEff:")]
        if not eff or int(eff[0], 16):
            raise OSError("capabilities are still effective")
    ok(libc.prctl(1, 9, 0, 0, 0), "pdeathsig")         # PR_SET_PDEATHSIG: SIGKILL when the launcher dies
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a too-large write raises OSError(EFBIG) instead

    class CpuTimeLimit(BaseException):
        pass

    def on_xcpu(signum, frame):
        raise CpuTimeLimit()
    signal.signal(signal.SIGXCPU, on_xcpu)
    if cfg["block_network"]:
        import socket, _socket

        def refuse(*a, **k):
            raise PermissionError("network access is disabled in this sandbox")

        class NoSocket(_socket.socket):
            def __init__(self, *a, **k):
                refuse()
        _socket.socket = socket.socket = socket.SocketType = NoSocket
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            setattr(socket, name, refuse)
        for name in ("system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
                     "execlp", "execlpe", "execvp", "execvpe"):
            if hasattr(os, name):
                setattr(os, name, refuse)
        for name in ("ctypes", "_ctypes", "_posixsubprocess"):
            sys.modules[name] = None
    return CpuTimeLimit

try:
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    CpuTimeLimit = setup()
except BaseException as exc:
    report("error", "sandbox_setup", type(exc).__name__ + ": " + str(exc))
    os._exit(70)

def where(exc):
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "program.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None:
        return ""
    lines = source.splitlines()
    text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return "line %d: %s" % (line, text[:200])

if cfg["supervise"]:  # PID 1 of the namespace: the program runs in a child (PID 1 ignores SIGKILL from inside)
    child = os.fork()
    if child:
        import signal
        signal.signal(signal.SIGALRM, lambda *a: os._exit(124))
        signal.alarm(cfg["alarm"])  # ends the namespace even if the evaluator died without killing it
        while True:
            try:
                pid, status = os.waitpid(-1, 0)  # reap every orphan until the program itself ends
            except ChildProcessError:
                os._exit(70)
            if pid == child:
                os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
sys.argv = ["program.py"]
del cfg
env = {"__name__": "__sandbox__", "__builtins__": __builtins__, "__file__": "program.py"}
try:
    exec(compile(source, "program.py", "exec"), env)
except CpuTimeLimit:
    report("timeout", "cpu_time", "the CPU-time limit was reached")
except AssertionError as exc:
    report("failed", "AssertionError", " ".join(p for p in (where(exc), str(exc)) if p))
except SyntaxError as exc:
    report("error", type(exc).__name__, "line %s: %s" % (exc.lineno, exc.msg))
except SystemExit as exc:
    report("error", "SystemExit", "the program called exit(%r) before its tests finished" % (exc.code,))
except BaseException as exc:
    report("error", type(exc).__name__, " ".join(p for p in (where(exc), str(exc)[:300]) if p))
else:
    report("passed")
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
os._exit(0)
'''

_NR_MOUNT_SETATTR = 442  # the same number on x86_64, arm64 and the other unified-table architectures
_PROBE = ("import collections, hashlib, itertools, json, math, re, string, typing\n"
          "with open('/proc/self/net/dev') as f:\n"
          "    ifaces = sorted(l.split(':')[0].strip() for l in f.readlines()[2:])\n"
          "print(json.dumps({'uid': __import__('os').getuid(), 'ifaces': ifaces}))\n")


@dataclass(frozen=True)
class _Setup:
    python: str
    namespaces: bool            # unshare: own network + PID namespaces
    private_tmp: bool           # own mount namespace with /tmp, /var/tmp, /dev/shm private
    readonly: bool              # ... and every other mount read-only
    user_ns: bool               # non-root: a user namespace (-r), capabilities dropped in it
    drop_uid: bool              # started as root: switch to an unprivileged uid per run
    own_proc: bool = False      # a fresh /proc that shows only the run's processes


def _uid_pool_base():
    """First uid of this process's range of run uids: unused high uids inside the mapped range."""
    lo, count = 0, 1 << 32
    try:
        rows = [list(map(int, l.split())) for l in Path("/proc/self/uid_map").read_text().splitlines() if l.strip()]
        if rows:
            inside, _, count = max(rows, key=lambda r: r[2])
            lo = inside
    except OSError:
        pass
    if count >= (1 << 31):
        return 1_900_000_000 + (os.getpid() % 100_000) * 1024
    return lo + max(1000, count // 2) + (os.getpid() % 64) * 64


_UID_BASE = _uid_pool_base()
_FREE_SLOTS = queue.SimpleQueue()  # run uids not in use now: _UID_BASE + slot, one slot per concurrent run
_SLOTS = {"count": 0}
_SLOT_LOCK = threading.Lock()


def _take_slot():
    try:
        return _FREE_SLOTS.get_nowait()
    except queue.Empty:
        with _SLOT_LOCK:
            _SLOTS["count"] += 1
            return _SLOTS["count"] - 1


def _unshare_cmd(s: _Setup):
    cmd = [shutil.which("unshare") or "unshare", "--net", "--pid", "--ipc", "--fork", "--kill-child"]
    if s.private_tmp:
        cmd += ["--mount", "--propagation", "private"] + (["--mount-proc"] if s.own_proc else [])
    if s.user_ns:
        cmd.append("--map-root-user")
    return cmd + ["--"]


class Sandbox:
    """Runs Python programs one per process under `limits`; `run(program)` -> Result; `run_many(...)` in parallel.

    isolation: "auto" (namespaces where they work, else the fallback), "namespaces" (refuse to run without them)
    or "plain" (the fallback, even where namespaces work). python: the interpreter for the programs (default:
    this one, else /usr/bin/python3 when an unprivileged uid cannot run this one).
    """

    _detected = {}
    _detect_lock = threading.Lock()

    def __init__(self, limits: Limits = Limits(), python: Optional[str] = None, isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "plain"):
            raise ValueError(f"isolation must be auto, namespaces or plain, not {isolation!r}")
        self.limits = limits
        with Sandbox._detect_lock:
            key = (python, isolation)
            if key not in Sandbox._detected:
                Sandbox._detected[key] = self._detect(python, isolation)
            self.setup = Sandbox._detected[key]
        self.protection = self._describe()

    # ---- setup detection -------------------------------------------------------------------------
    def _candidates(self, s_list, python):
        pythons = [python] if python else [sys.executable, "/usr/bin/python3", shutil.which("python3")]
        seen = []
        for p in pythons:
            if p and p not in seen and os.access(p, os.X_OK):
                seen.append(p)
        return [replace(s, python=p) for s in s_list for p in seen]

    def _detect(self, python, isolation):
        root = os.geteuid() == 0
        have_unshare = shutil.which("unshare") is not None
        ns = [_Setup("", True, True, True, not root, root, True), _Setup("", True, True, True, not root, root),
              _Setup("", True, True, False, not root, root), _Setup("", True, False, False, not root, root)]
        plain = [_Setup("", False, False, False, False, root)]
        options = (ns if have_unshare else []) if isolation == "namespaces" else \
            plain if isolation == "plain" else (ns if have_unshare else []) + plain
        tried = []
        for s in self._candidates(options, python):
            probe = self._run(_PROBE, replace(self.limits, timeout=max(30.0, self.limits.timeout),
                                              memory_mb=max(256, self.limits.memory_mb)), s, None)
            ok = probe.status == "passed"
            if ok and s.namespaces:
                try:
                    ok = json.loads(probe.stdout.strip().splitlines()[-1])["ifaces"] == ["lo"]
                except (ValueError, KeyError, IndexError):
                    ok = False
            if ok:
                return s
            tried.append(f"{'namespaces' if s.namespaces else 'plain'} with {s.python}: "
                         f"{probe.kind or probe.status} {probe.message or probe.stderr.strip()[-200:]}".strip())
        if isolation == "namespaces":
            raise UserError("the code sandbox needs `unshare` (util-linux) with network and PID namespaces, which "
                            "do not work here (" + "; ".join(tried or ["unshare is not installed"]) + "); use "
                            "isolation 'auto' to fall back to the weaker in-process protections")
        raise UserError("the code sandbox could not run a test program (" + "; ".join(tried) + "); "
                        + ("running as root, it needs a Python interpreter that an unprivileged uid can run: pass "
                           "--code_python /usr/bin/python3 (or another one outside /root)" if root else
                           "pass --code_python with a working Python 3 interpreter"))

    def _describe(self):
        s = self.setup
        user = ("an unprivileged uid of its own per run, no groups, no_new_privs" if s.drop_uid else
                "root of a user namespace without capabilities (your uid outside it), no_new_privs" if s.user_ns else
                "your own user (no_new_privs)")
        return {
            "isolation": "namespaces" if s.namespaces else "plain",
            "network": "none: own network namespace" if s.namespaces else
                       "in-process only: sockets, ctypes and starting programs disabled in Python (can be undone)",
            "processes": ("own PID and IPC namespaces: every process dies with the first"
                          + ("; /proc shows only the run's processes" if s.own_proc else "")) if s.namespaces else
                         "process group killed" + (", and every process of the run's uid" if s.drop_uid else
                                                   " (a process that calls setsid() can survive)"),
            "filesystem": ("read-only, except a private /tmp, /var/tmp and /dev/shm (the run's directory)" if s.readonly
                           else "private /tmp, /var/tmp and /dev/shm; the rest as the user sees it" if s.private_tmp
                           else "as the user sees it; only the working directory is private"),
            "user": user,
            "nproc": f"RLIMIT_NPROC {self.limits.nproc}" + (" per run" if (s.drop_uid or s.user_ns) else
                                                            " above the user's current process count"),
            "python": s.python,
        }

    # ---- one program ---------------------------------------------------------------------------------
    def run(self, program: str, stop: Optional[threading.Event] = None) -> Result:
        return self._run(program, self.limits, self.setup, stop)

    def _run(self, program, limits, s, stop):
        slot = _take_slot() if s.drop_uid else None
        uid = _UID_BASE + slot if slot is not None else None
        base = Path(tempfile.mkdtemp(prefix="sandbox-"))
        work = base / "work"
        try:
            os.chmod(base, 0o711)
            work.mkdir(mode=0o700)
            if uid is not None:
                os.chown(work, uid, uid)
            prog = base / "program.py"
            prog.write_text(program, encoding="utf-8")
            os.chmod(prog, 0o644)
            return self._exec(prog, work, limits, s, uid, stop)
        finally:
            if uid is not None:
                _kill_uid(uid)
            shutil.rmtree(base, onerror=_force_remove)
            if slot is not None:
                _FREE_SLOTS.put(slot)

    def _exec(self, prog, work, limits, s, uid, stop):
        cfg, env = _child_config(prog, work, limits, s, uid)
        r, w = os.pipe()
        cfg["result_fd"] = w
        cmd = (_unshare_cmd(s) if s.namespaces else []) + [s.python, "-I", "-S", "-B", "-X", "utf8", "-c",
                                                            _BOOTSTRAP, json.dumps(cfg)]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(w,), cwd=str(work), env=env, start_new_session=True)
        except OSError as exc:
            os.close(r)
            os.close(w)
            return Result("error", "sandbox_start", f"could not start {cmd[0]}: {exc}")
        os.close(w)
        got, ended = _pump(proc, r, start, limits, stop)
        duration = round(time.monotonic() - start, 3)
        return _result(got, ended, duration, proc.returncode, limits, s.namespaces)

    # ---- many programs -----------------------------------------------------------------------------
    def run_many(self, programs, workers: Optional[int] = None, on_result=None):
        """Run programs in parallel on `workers` threads (default: the CPU count); results in order.

        on_result(index, result) is called in this thread as each finishes. Any exception (from a worker or
        from on_result) stops the rest: running programs are killed, queued ones never start, and it is raised.
        """
        programs = list(programs)
        results = [None] * len(programs)
        if not programs:
            return results
        stop = threading.Event()
        pool = ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1), thread_name_prefix="sandbox")
        try:
            futures = {pool.submit(self.run, p, stop): i for i, p in enumerate(programs)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


def _child_config(prog, work, limits, s, uid):
    """The bootstrap's JSON config (its "result_fd" still None) and the environment for one run."""
    nproc = limits.nproc
    if not (s.drop_uid or s.user_ns):  # RLIMIT_NPROC counts all of this user's processes
        nproc += _user_tasks(os.getuid())
    cfg = {"program": str(prog), "dir": str(work), "result_fd": None, "uid": uid,
           "private_tmp": s.private_tmp, "readonly": s.readonly, "drop_caps": s.user_ns,
           "block_network": not s.namespaces, "supervise": s.namespaces,
           "alarm": int(math.ceil(limits.timeout)) + 5, "nr_mount_setattr": _NR_MOUNT_SETATTR,
           "limits": {"as": limits.memory_mb << 20, "cpu": limits.cpu_seconds(), "fsize": limits.file_mb << 20,
                      "nofile": limits.nofile, "nproc": nproc}}
    tmp = "/tmp" if s.private_tmp else str(work)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    return cfg, env


def _pump(proc, r, start, limits, stop):
    """Read the program's stdout and stderr and the report pipe `r` until it exits (and 0.5 s more while
    something still holds its pipes), its wall-clock time runs out or `stop` is set; then kill its process
    group, wait for it, drain the pipes for up to 1 s and close them all.

    Returns ({"stdout" | "stderr" | "report": (bytes kept, bytes cut)}, ended) with ended None (it exited),
    "timeout" or "cancelled"."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), r: bytearray()}
    cut = {fd: 0 for fd in bufs}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    ended = None
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # ended, but something still holds its pipes: it is killed below
            if exited_at is None and now - start > limits.timeout:
                ended = "timeout"
                break
            if stop is not None and stop.is_set():
                ended = "cancelled"
                break
            _read_ready(sel, bufs, cut, limits.output_bytes, r)
    finally:
        _kill_group(proc.pid)
        proc.wait()
        deadline = time.monotonic() + 1.0
        while sel.get_map() and time.monotonic() < deadline:
            _read_ready(sel, bufs, cut, limits.output_bytes, r)
        sel.close()
        os.close(r)
        proc.stdout.close()
        proc.stderr.close()
    names = {out_fd: "stdout", err_fd: "stderr", r: "report"}
    return {names[fd]: (bufs[fd], cut[fd]) for fd in bufs}, ended


def _read_ready(sel, bufs, cut, output_bytes, report_fd):
    """One select (50 ms at most), then read each ready pipe (the report pipe keeps up to 64 KiB)."""
    for key, _ in sel.select(timeout=0.05):
        _read(key.fd, sel, bufs, cut, output_bytes if key.fd != report_fd else 65536)


def _result(got, ended, duration, returncode, limits, namespaces):
    """The Result of one run from what _pump collected, how the run ended and the return code."""
    (out, out_cut), (err, err_cut) = got["stdout"], got["stderr"]
    res = Result("error", stdout=_text(out, out_cut), stderr=_text(err, err_cut), truncated=bool(out_cut or err_cut),
                 duration=duration, returncode=returncode)
    if ended == "cancelled":
        res.kind, res.message = "cancelled", "the evaluation stopped before this program finished"
        return res
    if ended == "timeout":
        res.status, res.kind, res.message = "timeout", "wall_clock", f"still running after {limits.timeout:g} s"
        return res
    lines = [l for l in bytes(got["report"][0]).decode("utf-8", "replace").splitlines() if l.strip()]
    if lines:
        return _from_report(res, lines[-1])
    return _from_exit(res, namespaces)


def _from_report(res, line):
    """Fill res from the bootstrap's last report line (a bad line is an error of kind bad_report)."""
    try:
        rep = json.loads(line)
        res.status, res.kind, res.message = rep["status"], rep["kind"], rep["message"]
        if res.status not in STATUSES:
            raise ValueError(res.status)
    except (ValueError, KeyError, TypeError):
        res.status, res.kind, res.message = "error", "bad_report", line[:200]
    return res


def _from_exit(res, namespaces):
    """Fill res for a program that wrote no report: killed by a signal, or exited before its tests finished."""
    rc = res.returncode
    sig = -rc if rc is not None and rc < 0 else rc - 128 if namespaces and rc and rc > 128 else None
    if sig:  # killed by a signal (in namespaces the supervisor exits with 128 + its number)
        if sig == signal.SIGXCPU:
            res.status, res.kind, res.message = "timeout", "cpu_time", "the CPU-time limit was reached"
        else:
            name = signal.Signals(sig).name if sig in set(signal.Signals) else f"signal {sig}"
            res.kind = "killed"
            res.message = f"killed by {name}" + (" (the CPU-time hard limit or the out-of-memory killer)"
                                                 if sig == signal.SIGKILL else "")
    else:
        last = res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else ""
        res.kind = "exited"
        res.message = f"the program exited (code {rc}) before its tests finished" + (f": {last}" if last else "")
    return res


def _read(fd, sel, bufs, cut, limit):
    try:
        data = os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        sel.unregister(fd)
        return
    room = limit - len(bufs[fd])
    if room > 0:
        bufs[fd] += data[:room]
    cut[fd] += max(0, len(data) - max(room, 0))


def _text(buf, cut):
    text = bytes(buf).decode("utf-8", "replace")
    return text + (f"\n...[{cut} more bytes cut]" if cut else "")


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_uids():
    """(pid, real uid) of every process visible in /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        out.append((int(d), int(line.split()[1])))
                        break
        except (OSError, ValueError):
            continue
    return out


def _kill_uid(uid, rounds=50):
    """SIGKILL every process of `uid` (a run's own uid) until none is left."""
    for _ in range(rounds):
        pids = [p for p, u in _proc_uids() if u == uid]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _user_tasks(uid):
    """Processes + threads of `uid` now (what RLIMIT_NPROC counts for a user without its own namespace)."""
    n = 0
    for pid, u in _proc_uids():
        if u != uid:
            continue
        try:
            n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            n += 1
    return n


def _force_remove(func, path, exc_info):
    """rmtree error handler: make the parent writable (a program may have chmod-ed it) and try again."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, onerror=_force_remove)
        else:
            os.unlink(path)
    except OSError:
        pass
