"""Grading inside the sandbox: the tests run in a trusted process that the program cannot reach.

Loaded by ``_sandbox_child.py`` (by file path, standard library only) when ``run_program(..., harness=...)`` is
given. Once the sandbox is set up, the child (the *harness*, H) forks a *worker* (W):

- W closes the harness's descriptors, applies the reliability guard, runs the untrusted program as ``__main__`` and
  then serves requests from H over a socket pair: look up a global of the program, call, get or set an attribute or an
  item, iterate, take a length.
- H reads the test code only *after* the fork (from a descriptor W closed, so it is nowhere in W's memory), runs it in
  its own namespace in which the names the tests use but do not define are proxies for the program's objects, and
  writes the verdict, one JSON object, to a pipe the parent gave it and W closed.
- Values cross from W to H as plain data only: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
  ``bytes`` and ``list``, ``tuple``, ``dict``, ``set``, ``frozenset`` of them, exact types (no subclasses), rebuilt in H
  as fresh builtin objects. Anything else stays in W behind a :class:`ProgramObject` handle, which equals only itself,
  refuses ``bool()`` and forwards attribute, item and call access. An object whose ``__eq__`` always returns True
  therefore never reaches a comparison.
- H makes itself non-dumpable, so W (same user, no capabilities) can neither ptrace it, read its memory nor open its
  descriptors through ``/proc``. W can kill H or itself, or stop answering: every such outcome is a failed or missing
  verdict, never a pass.

So exiting early (``os._exit(0)``, ``sys.exit(0)``, ``raise SystemExit`` anywhere), replacing exit functions,
patching ``unittest`` and always-equal objects cannot make tests pass: the only way to pass is to return the right
values. The cost is fidelity in rare cases: a test that passes a non-plain object *into* the program (a lambda, an
instance of a class the test defines) or checks that an argument was mutated in place cannot be run this way; such a
test fails with a reason saying so.
"""

import ast
import builtins
import ctypes
import importlib
import json
import os
import signal
import socket
import sys
import traceback

_EXIT_MEMORY = 113  # as _sandbox_child.EXIT_MEMORY: the parent reports the run as "memory"
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_MAX_MESSAGE = 16 << 20  # bytes of one request or reply
_MAX_HARNESS = 16 << 20  # bytes of test code
_MAX_REASON = 2000  # characters of a failure reason in the verdict
_SCALARS = (type(None), bool, int, float, str)
_SEQUENCES = {list: "l", tuple: "t", set: "s", frozenset: "f"}
_BUILD = {"l": list, "t": tuple, "s": set, "f": frozenset}


class ProgramExited(BaseException):
    """The program's process is gone (it exited or was killed): nothing more can be asked of it."""


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one, or answered with something that is not valid."""


class NotPlainData(TypeError):
    """A test passed something to the program that cannot cross to it (only plain data and program objects can)."""


# ---------------------------------------------------------------------------------------------------------------
# plain data, both ways


def encode(value, handle_of=None, depth=0):
    """``value`` as JSON-able data (tags for everything but scalars); objects that are not plain data become a handle
    through ``handle_of(obj) -> dict`` (W's side) or raise :class:`NotPlainData` (H's side, ``handle_of=None``)."""
    if depth > 200:
        raise NotPlainData("nested more than 200 levels deep")
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind in _SEQUENCES:
        return {_SEQUENCES[kind]: [encode(item, handle_of, depth + 1) for item in value]}
    if kind is dict:
        return {"d": [[encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if kind is ProgramObject:
        return {"h": value._handle}
    if handle_of is None:
        raise NotPlainData(f"a {kind.__name__} object cannot be passed to the program (only plain data can)")
    return handle_of(value)


def decode(data, object_of, depth=0):
    """The value ``data`` encodes, built from fresh builtin objects; a handle becomes ``object_of(handle_dict)``."""
    if depth > 200:
        raise ProgramError("a value nested more than 200 levels deep")
    kind = type(data)
    if kind in _SCALARS:
        return data
    if kind is not dict or len(data) not in (1, 2):
        raise ProgramError(f"malformed value {str(data)[:80]!r}")
    if "h" in data:
        return object_of(data)
    if len(data) != 1:
        raise ProgramError(f"malformed value {str(data)[:80]!r}")
    ((tag, body),) = data.items()
    if tag in _BUILD and type(body) is list:
        return _BUILD[tag](decode(item, object_of, depth + 1) for item in body)
    if tag == "d" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
        return {decode(k, object_of, depth + 1): decode(v, object_of, depth + 1) for k, v in body}
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    raise ProgramError(f"malformed value {str(data)[:80]!r}")


def _send(sock, message):
    data = json.dumps(message).encode()
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv_exactly(sock, size):
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProgramExited("the program's process is gone")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock):
    size = int.from_bytes(_recv_exactly(sock, 4), "big")
    if size > _MAX_MESSAGE:
        raise ProgramError(f"a message of {size} bytes (over the {_MAX_MESSAGE} byte cap)")
    return json.loads(_recv_exactly(sock, size))


# ---------------------------------------------------------------------------------------------------------------
# W: the worker that runs the program and answers


class _Worker:
    def __init__(self, sock, program_globals):
        self.sock = sock
        self.globals = program_globals
        self.objects = {}

    def handle_of(self, obj):
        handle = len(self.objects) + 1
        self.objects[handle] = obj
        return {"h": handle, "type": type(obj).__name__}

    def reply_value(self, value):
        try:
            return {"v": encode(value, self.handle_of)}
        except NotPlainData:  # nested too deep: the whole value stays here
            return {"v": self.handle_of(value)}

    def obj(self, request):
        return self.objects[request["h"]]

    def value(self, data):
        return decode(data, lambda handle: self.objects[handle["h"]])

    def answer(self, request):
        op = request["op"]
        if op == "names":
            return {"v": encode([name for name, value in self.globals.items() if type(value) is not type(sys)])}
        if op == "global":
            if request["name"] not in self.globals:
                raise NameError(f"name {request['name']!r} is not defined by the program")
            return self.reply_value(self.globals[request["name"]])
        target = self.obj(request)
        if op == "call":
            args = [self.value(a) for a in request["args"]]
            kwargs = {k: self.value(v) for k, v in request["kwargs"].items()}
            return self.reply_value(target(*args, **kwargs))
        if op == "getattr":
            return self.reply_value(getattr(target, request["name"]))
        if op == "setattr":
            setattr(target, request["name"], self.value(request["value"]))
            return {"v": None}
        if op == "getitem":
            return self.reply_value(target[self.value(request["key"])])
        if op == "setitem":
            target[self.value(request["key"])] = self.value(request["value"])
            return {"v": None}
        if op == "delitem":
            del target[self.value(request["key"])]
            return {"v": None}
        if op == "len":
            return self.reply_value(len(target))
        if op == "contains":
            return self.reply_value(self.value(request["item"]) in target)
        if op == "iter":
            return self.reply_value(iter(target))
        if op == "next":
            return self.reply_value(next(target))
        raise ProgramError(f"unknown request {op!r}")

    def serve(self):
        while True:
            try:
                request = _recv(self.sock)
            except ProgramExited:
                return
            try:
                reply = self.answer(request)
            except MemoryError:
                os._exit(_EXIT_MEMORY)
            except BaseException as exc:  # the program's own exceptions, SystemExit included, go back to the tests
                reply = {"e": [type(exc).__name__, str(exc)[:_MAX_REASON]]}
            _send(self.sock, reply)


# ---------------------------------------------------------------------------------------------------------------
# H: the trusted side


class _Link:
    """H's end of the socket pair: one request, one reply."""

    def __init__(self, sock):
        self.sock = sock

    def ask(self, op, **fields):
        _send(self.sock, {"op": op, **fields})
        reply = _recv(self.sock)
        if type(reply) is not dict or len(reply) != 1 or not ({"v", "e"} & reply.keys()):
            raise ProgramError(f"malformed reply {str(reply)[:80]!r}")
        if "e" in reply:
            raise _rebuild_exception(reply["e"])
        return decode(reply["v"], lambda handle: ProgramObject(self, handle))


def _rebuild_exception(error):
    """A builtin exception type (ValueError, KeyError, ...) comes back as itself so that assertRaises works; anything
    else (the program's own classes, SystemExit) as ProgramError."""
    if type(error) is not list or len(error) != 2 or not all(type(x) is str for x in error):
        return ProgramError("malformed exception from the program")
    name, message = error
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception) and kind.__module__ == "builtins":
        try:
            return kind(message)
        except Exception:  # exception types whose constructor wants other arguments (UnicodeDecodeError, ...)
            pass
    return ProgramError(f"{name}: {message}")


class ProgramObject:
    """A handle to an object that lives in the program's process (not plain data). Equal only to itself; truth value,
    hashing by value and arithmetic are refused; attributes, items, calls, ``len`` and iteration are forwarded."""

    __slots__ = ("_link", "_handle", "_type")

    def __init__(self, link, handle):
        if type(handle.get("h")) is not int:
            raise ProgramError("malformed object handle")
        object.__setattr__(self, "_link", link)
        object.__setattr__(self, "_handle", handle["h"])
        object.__setattr__(self, "_type", str(handle.get("type", "object"))[:80])

    def __repr__(self):
        return f"<program object {self._type} #{self._handle}>"

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__

    def __bool__(self):
        raise ProgramError(f"the program returned a {self._type} object where a truth value is tested (not plain data)")

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._link.ask("getattr", h=self._handle, name=name)

    def __setattr__(self, name, value):
        self._link.ask("setattr", h=self._handle, name=name, value=encode(value))

    def __call__(self, *args, **kwargs):
        return self._link.ask(
            "call", h=self._handle, args=[encode(a) for a in args], kwargs={k: encode(v) for k, v in kwargs.items()}
        )

    def __getitem__(self, key):
        return self._link.ask("getitem", h=self._handle, key=encode(key))

    def __setitem__(self, key, value):
        self._link.ask("setitem", h=self._handle, key=encode(key), value=encode(value))

    def __delitem__(self, key):
        self._link.ask("delitem", h=self._handle, key=encode(key))

    def __len__(self):
        n = self._link.ask("len", h=self._handle)
        if type(n) is not int:
            raise ProgramError("len() of a program object did not give an int")
        return n

    def __contains__(self, item):
        found = self._link.ask("contains", h=self._handle, item=encode(item))
        if type(found) is not bool:
            raise ProgramError("`in` on a program object did not give a bool")
        return found

    def __iter__(self):
        iterator = self._link.ask("iter", h=self._handle)
        if type(iterator) is not ProgramObject:
            raise ProgramError("iter() of a program object did not give an iterator")
        while True:
            try:
                yield self._link.ask("next", h=iterator._handle)
            except StopIteration:
                return


def free_names(tree):
    """Names the test code reads but never binds itself (builtins excluded): what the program must provide."""
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def _short(exc, lines=()):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<tests>"]
    where = ""
    if frames and frames[-1].lineno and frames[-1].lineno <= len(lines):
        where = f" (tests line {frames[-1].lineno}: {lines[frames[-1].lineno - 1].strip()})"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return (text + where)[:_MAX_REASON]


def _run_tests(link, spec, test_source, program_names):
    """Run the trusted test code; returns the verdict dict (passed, reason, details)."""
    namespace = {"__name__": "__ponderttt_tests__", "__builtins__": builtins}
    outcome = {}
    namespace["ponderttt_verdict"] = lambda passed, details=None: outcome.update(passed=passed, details=details)
    try:
        tree = ast.parse(test_source, "<tests>")
        exec(compile(spec.get("preamble", ""), "<preamble>", "exec"), namespace)
    except Exception as exc:
        return {"passed": False, "harness_error": True, "reason": f"the tests could not be set up: {_short(exc)}"}
    for name in spec.get("remote", ()):
        namespace.pop(name, None)
    for name in sorted(free_names(tree) - namespace.keys()):
        if name in sys.stdlib_module_names:  # the tests' own imports, never the program's (possibly patched) modules
            namespace[name] = importlib.import_module(name)
    for name in sorted((free_names(tree) | set(spec.get("remote", ()))) - namespace.keys()):
        if name in program_names:
            namespace[name] = link.ask("global", name=name)
    try:
        exec(compile(tree, "<tests>", "exec"), namespace)
    except ProgramExited:
        return {"passed": False, "reason": "the program's process ended while the tests ran"}
    except BaseException as exc:
        return {"passed": False, "reason": _short(exc, test_source.splitlines())}
    if outcome:
        return {"passed": outcome["passed"] is True, "reason": "verdict of the tests", "details": outcome["details"]}
    return {"passed": True, "reason": "all tests passed"}


def _read_fd(fd, limit):
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise ValueError(f"the test code is over {limit} bytes")
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8")


def _wait_worker(pid, block):
    """W's exit status as the parent would see it (negative: signal), or None while it runs."""
    done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def run_graded(code, graded, run_program):
    """H's main: fork W (which calls ``run_program(code)`` and serves), run the tests, write the verdict, exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    ours, theirs = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # W: nothing of the harness may stay reachable
        os.close(graded["harness_fd"])
        os.close(graded["verdict_fd"])
        ours.close()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        program_globals = run_program(code)  # returns only if the program's top level finished
        _send(theirs, {"ready": True})
        _Worker(theirs, program_globals).serve()
        os._exit(0)
    theirs.close()
    sys.stdout = sys.stderr  # the tests' prints must not mix with the program's output
    verdict_fd = graded["verdict_fd"]
    try:
        test_source = _read_fd(graded["harness_fd"], _MAX_HARNESS)
        link = _Link(ours)
        try:
            if _recv(ours) != {"ready": True}:
                raise ProgramError("the program did not start the test server")
            program_names = set(link.ask("names"))
        except (ProgramExited, ProgramError, ValueError):
            verdict = {"passed": False, "reason": "the program ended before the tests ran"}
        else:
            verdict = _run_tests(link, graded["spec"], test_source, program_names)
        exit_status = _wait_worker(pid, block=False)
        if exit_status is not None:
            verdict["program_exit"] = exit_status
    except BaseException as exc:  # a verdict is always written: a broken harness is an error, never a pass
        verdict = {"passed": False, "harness_error": True, "reason": f"harness failure: {exc!r}"[:_MAX_REASON]}
    ours.close()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        _wait_worker(pid, block=True)
    except ChildProcessError:
        pass
    os.write(verdict_fd, json.dumps(verdict, default=repr).encode()[: 1 << 20])
    os.close(verdict_fd)
    sys.stderr.flush()
    os._exit(0)
