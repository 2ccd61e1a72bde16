#!/usr/bin/env python3
"""Drives a program (the real OpenSSH `ssh`) inside a real pseudo-terminal, like a person.

Usage: pty_drive.py STEPS_JSON -- program args...
STEPS_JSON is a list of steps:
  {"send": "text"}                       type text (\\r is Enter)
  {"expect": "regex", "timeout": 10}     wait until the terminal output matches
  {"resize": [rows, cols]}               resize the terminal (the kernel sends SIGWINCH)
  {"wait_exit": 10}                      wait for the program to exit
The transcript goes to stdout; exit status 0 when every step passed, 1 otherwise, and the
program's exit status is printed last as `[exit N]`.
"""
import fcntl, json, os, pty, re, select, struct, sys, termios, time

def main():
    steps = json.loads(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    buf = b""
    status = None

    def pump(timeout):
        nonlocal buf
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return False
            if not data:
                return False
            buf += data
        return True

    ok = True
    for step in steps:
        if "send" in step:
            os.write(fd, step["send"].encode())
        elif "expect" in step:
            end = time.time() + step.get("timeout", 10)
            pat = re.compile(step["expect"].encode())
            while not pat.search(buf):
                if time.time() > end or not pump(0.05):
                    if not pat.search(buf):
                        sys.stderr.write("expect %r failed\n" % step["expect"])
                        ok = False
                    break
        elif "resize" in step:
            rows, cols = step["resize"]
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        elif "wait_exit" in step:
            end = time.time() + step["wait_exit"]
            while time.time() < end:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(st)
                    break
                pump(0.05)
        if not ok:
            break
    # Drain what is left (bounded: after a failed expect the session is still open).
    drain_end = time.time() + 3
    while time.time() < drain_end and pump(0.1):
        pass
    if status is None:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        _, st = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(st)
    sys.stdout.write(buf.decode("utf-8", "replace"))
    sys.stdout.write("\n[exit %d]\n" % status)
    sys.exit(0 if ok else 1)

main()
