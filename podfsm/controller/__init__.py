"""The Controller: runs each sandbox's state machine against the drivers.

Shape (after containerd's podsandbox controller): every forward step is followed at once by the
registration of its compensating step; a failure unwinds them LIFO, shielded from the caller's
cancellation and bounded by its own timeout, and the error says which step failed and what (if
anything) could not be undone. The record is written before each step that touches the system
(`pending` names it), so a restart knows what may be half done and can finish or unwind it.

Durability, in short (see _recover_one and _collect_orphans):
- a crash anywhere leaves every sandbox Ready (re-attached to supervision), NotReady (an
  interrupted run keeps what it made, its netns and address, until stop/remove, as containerd
  does), or gone (an interrupted remove is finished; so is an interrupted stop);
- a sandbox has a run directory (<run_dir>/sandboxes/<id>) from before its first system step
  until after its record is gone, so what a lost or corrupt record leaves is still known by id
  and collected on the next start; nothing outside our own directories, runtime root, netns pin
  tag and those ids is ever touched;
- a cancelled caller never leaves a half-made sandbox: steps whose work goes on in another
  process (namespace worker, reaper) and record writes are shielded, so cancellation lands
  between steps, and then the unwinding (shielded too) undoes exactly what was done; a stop or
  remove, once begun, is finished.

One sandbox's operations are serialized by its lock; different sandboxes run in parallel, at most
`max_parallel` doing system work at once. The embedding program's process never unshares, never
forks without exec, installs no signal handlers and never becomes a subreaper: namespaces are made
in worker subprocesses and the pause processes are reaped by the runtime's reaper process.

Layout: base.py (shared state, records, events), teardown.py (compensating steps, stop,
remove, supervision), run.py (admission and the forward steps), recovery.py (start-up),
api.py (the public Controller); each layer builds on the one before.
"""

from podfsm.controller.api import Controller
from podfsm.controller.base import FailpointError

__all__ = ["Controller", "FailpointError"]
