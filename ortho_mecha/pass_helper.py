"""The helper process of a large analysis pass: ``python -m ortho_mecha.pass_helper``.

Reads a pickled :class:`ortho_mecha.analysis.HelperSpec` on stdin, takes chunks, then signal tasks, from
the pass's shared queues (file descriptors it inherits) and writes its pickled
:class:`~ortho_mecha.analysis.HelperResult` on stdout, or the error's text, with exit status 1.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys


def main() -> int:
    # Ctrl-C reaches the whole process group: the pass that started this helper handles it (and ends it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ortho_mecha.analysis import helper_main

    try:
        answer: object = helper_main(pickle.load(sys.stdin.buffer))
        code = 0
    except Exception as exc:  # the pass raises it, with this text
        answer, code = f"{type(exc).__name__}: {exc}", 1
    try:
        pickle.dump(answer, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # the pass is gone: nobody to answer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor to flush to at exit
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
