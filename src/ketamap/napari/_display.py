"""A virtual X display for napari where there is no screen (tests, benchmarks, servers)."""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["start_xvfb"]


def start_xvfb(*, terminate_with_last_client: bool = False):
    """Start Debian's ``Xvfb`` on a free display number.

    Qt's ``offscreen`` platform has no OpenGL, so napari cannot draw there; a virtual
    X server can.

    Parameters
    ----------
    terminate_with_last_client : bool
        Let the server end itself when its last client disconnects (``-terminate``).

    Returns
    -------
    (subprocess.Popen, str) or (None, None)
        The server and its ``DISPLAY`` value (``":N"``), or ``(None, None)`` when
        ``Xvfb`` is not installed or did not start.
    """
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        return None, None
    read, write = os.pipe()
    args = [xvfb, "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"]
    proc = subprocess.Popen(
        args + (["-terminate"] if terminate_with_last_client else []),
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    number = b""
    while not number.endswith(b"\n"):  # Xvfb writes the number, then the newline: read both
        chunk = os.read(read, 32)
        if not chunk:
            break
        number += chunk
    os.close(read)
    number = number.decode().strip()
    if not number:
        proc.kill()
        return None, None
    return proc, f":{number}"
