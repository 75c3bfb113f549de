"""Test-session set-up shared by every test module."""

import signal

# Started as a background job of a non-interactive shell (or by a runner that does so), this process and
# every child it spawns would ignore SIGINT, and varprop keeps an ignored signal ignored (as under nohup):
# the tests that send a Ctrl-C to a varprop command would then see it run on. A handler here (not an
# ignore) leaves the children SIGINT's default, as a terminal gives them.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
