"""Behaves like Slicer's ``PythonSlicer`` launcher (CTK AppLauncher) for the job tests.

``launcher.py PIDFILE COMMAND...`` starts COMMAND as a child that inherits stdin, stdout and
stderr (QProcess with forwarded channels), writes the child's pid to PIDFILE, waits, and exits
with the child's exit code.  Like the real launcher it installs no signal handler and forwards no
signal: terminating or killing it leaves the child running.
"""
import subprocess
import sys
from pathlib import Path

child = subprocess.Popen(sys.argv[2:])
Path(sys.argv[1]).write_text(str(child.pid))
sys.exit(child.wait())
