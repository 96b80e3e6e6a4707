"""A site's handling of one round: decode the task, train locally, encode the update."""

from __future__ import annotations

from fedcare.federation.engine import derive_seed
from fedcare.federation.messages import (
    SiteUpdate,
    Task,
    UpdateHeader,
    decode_task,
    encode_update,
)
from fedcare.federation.rounds import RoundError
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study
from fedcare.training import train_local


class SiteWorker:
    """Turns a task payload into an update payload for one site and one study."""

    def __init__(self, study: Study, data: SiteDataset, n_params: int) -> None:
        self.study = study
        self.data = data
        self.n_params = n_params

    def handle(self, task_bytes: bytes) -> bytes:
        """Train on local data from the task's global model; return the encoded delta."""
        return encode_update(self.train(task_bytes)[1])

    def train(self, task_bytes: bytes) -> tuple[Task, SiteUpdate]:
        """The decoded task and this site's update for it (kept local under secure aggregation)."""
        task = decode_task(task_bytes, self.n_params)
        if task.header.study_hash != self.study.content_hash:
            raise RoundError(
                f"site '{self.data.name}' refuses a task for study {task.header.study_hash[:12]}; "
                f"it runs study {self.study.content_hash[:12]}"
            )
        result = train_local(
            self.study.model,
            self.study.training,
            task.params,
            self.data.x_train,
            self.data.y_train,
            seed=derive_seed(task.header.seed, self.data.name),
        )
        update = SiteUpdate(
            header=UpdateHeader(
                study_hash=self.study.content_hash,
                round=task.header.round,
                site=self.data.name,
                n_samples=result.n_samples,
                loss=result.loss,
            ),
            delta=result.params - task.params,
        )
        return task, update
