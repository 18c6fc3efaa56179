"""What runs in worker processes: the job functions and the worker class.

Nothing on the terminal's side imports this package; the command line reaches
it only inside the commands that start workers.
"""

from .jobs import ALLOWED, PoisonBatch, apply_batch
from .worker import PerthJob, PerthWorker, UnknownJobFunction

__all__ = ["ALLOWED", "PerthJob", "PerthWorker", "PoisonBatch", "UnknownJobFunction", "apply_batch"]
