import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The suite runs one pytest-xdist worker per core; one thread each keeps tiny-model tests fast and free of contention.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class FakeHub:
    """``HfApi.create_repo`` / ``create_commit`` writing into a local Hub cache, so that ``from_pretrained("org/name")``
    resolves offline from the same files a real push would have uploaded."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.commits: list[tuple[str, list[str]]] = []

    def snapshot(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.snapshot(repo_id).mkdir(parents=True, exist_ok=True)
        refs = self.cache / f"models--{repo_id.replace('/', '--')}" / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text("0" * 40)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, *, commit_message, **kwargs):
        from huggingface_hub import CommitInfo

        snapshot = self.snapshot(repo_id)
        paths = []
        for op in operations:
            target = snapshot / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                shutil.copyfile(source, target)
            else:
                target.write_bytes(source if isinstance(source, bytes) else source.read())
            paths.append(op.path_in_repo)
        self.commits.append((repo_id, sorted(paths)))
        url = f"https://huggingface.co/{repo_id}/commit/{'0' * 40}"
        return CommitInfo(commit_url=url, commit_message=commit_message, commit_description="", oid="0" * 40)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: hub.create_repo(self, repo_id, **kw))
    monkeypatch.setattr(
        HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: hub.create_commit(self, repo_id, operations, **kw),
    )
    return hub
