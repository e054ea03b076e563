"""What verl loads at `import verl`: opd's replica kind and loss, registered in that process.

verl imports every entry point of the group `verl.plugins` when it is imported (in the driver
and in every Ray worker), and opd's pyproject names this module there, so installing
`opd[verl]` is the whole set-up. verl logs a plugin that fails to load at debug level only;
`python -c "import opd.client.verl.plugin"` shows why it failed.
"""

from __future__ import annotations

from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry

from opd.client.verl import loss
from opd.client.verl.settings import ENGINE


def _replica_class() -> type[RolloutReplica]:
    from opd.client.verl.replica import OpdReplica

    return OpdReplica


RolloutReplicaRegistry.register(ENGINE, _replica_class)
loss.install()
