"""Hugging Face Hub model ids (`org/name[@revision]`) resolved to a local snapshot directory.

`huggingface_hub.snapshot_download` fetches (or, offline, finds in the hub cache) only the
files a model needs to load here; it reads HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and
HF_TOKEN itself, so jaxllm adds no settings of its own. A model that cannot be had (offline
and not cached, unknown repository or revision, gated without a token) is a ValueError
naming the id and the cache directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What loading a checkpoint reads: config, generation defaults, safetensors weights (and their
# shard index), the tokenizer in any of its layouts, and the chat template.
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)

# org/name with the Hub's name characters, optionally @revision (branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class HubModelId:
    """A model repository on the Hub and the revision to take (None: its default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(model: str) -> HubModelId | None:
    """The hub id `model` spells (`org/name` or `org/name@revision`), or None if it is not
    shaped like one (an absolute or multi-level path, a file name)."""
    match = _HUB_ID.match(model)
    if match is None or model.endswith((".gguf", "/")):
        return None
    return HubModelId(match["repo"], match["rev"])


def download_model(hub_id: HubModelId) -> Path:
    """The local snapshot directory of `hub_id`, downloading the files a model needs unless
    they are already cached (offline: only the cache is read)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = constants.HF_HUB_CACHE
    try:
        # Offline, say so up front: given a commit hash, snapshot_download would otherwise
        # still ask the Hub for the file list (and fail) before reading the cache.
        return Path(snapshot_download(hub_id.repo_id, revision=hub_id.revision,
                                      allow_patterns=list(MODEL_FILE_PATTERNS),
                                      local_files_only=constants.is_offline_mode()))
    except LocalEntryNotFoundError as e:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ValueError(f"model {hub_id} is not in the hub cache {cache} and could not be "
                         f"downloaded{offline}: {e}") from e
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ValueError(f"model {hub_id} is not available on the hub (unknown repository or "
                         f"revision, or gated: set HF_TOKEN); cache {cache}: {e}") from e
    except HfHubHTTPError as e:
        raise ValueError(f"model {hub_id} could not be downloaded into {cache}: {e}") from e
