"""`hf:OWNER/REPO/FILE.gguf` model names: GGUF files fetched from the Hugging Face Hub by `huggingface_hub`.

The download is huggingface_hub's own (`hf_hub_download`): its cache (`HF_HUB_CACHE`, else `HF_HOME/hub`), its
offline mode (`HF_HUB_OFFLINE=1`: the cache only, no request), an interrupted download resumed where it stopped,
and its progress bar, which it shows only when stderr is a terminal. A `tokenizer.json` beside the GGUF in the
repository comes along when there is one: the embedded engine checks the GGUF's special tokens against it.

Every failure is a `ConfigurationError` of one line that says what to do; nothing here loads a model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from functionary_agent.errors import ConfigurationError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
INSTALL_HINT = "pip install 'functionary-agent[hub]'"
TOKENIZER_FILE = "tokenizer.json"
_USAGE = "write hf:OWNER/REPO/FILE.gguf (a GGUF file of a Hugging Face model repository)"
# Hugging Face repository ids: letters, digits, '-', '_' and '.', neither starting nor ending with '-' or '.'
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_NAME = re.compile(rf"(?P<owner>{_PART})/(?P<repo>{_PART})/(?P<file>[^\x00-\x1f\\]+)")


@dataclass(frozen=True)
class HubFile:
    """One file of a model repository on the Hub: `repo_id` is OWNER/REPO, `filename` its path in the repo."""

    repo_id: str
    filename: str

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo_id}/{self.filename}"

    def beside(self, name: str) -> HubFile:
        """The file called `name` in the same folder of the same repository."""
        folder = self.filename.rpartition("/")[0]
        return HubFile(self.repo_id, f"{folder}/{name}" if folder else name)


@dataclass(frozen=True)
class HubModel:
    """A downloaded GGUF (a path in the hub cache) and the repository's tokenizer.json beside it, if any."""

    gguf: Path
    tokenizer_json: Path | None


def is_hub_name(model: object) -> bool:
    return isinstance(model, str) and model.startswith(HUB_PREFIX)


def parse_hub_name(model: str) -> HubFile:
    """`hf:OWNER/REPO/PATH/FILE.gguf` as a `HubFile`, or a one-line `ConfigurationError` for a malformed name."""
    spec = model[len(HUB_PREFIX):] if model.startswith(HUB_PREFIX) else model
    match = _NAME.fullmatch(spec)
    if match is None:
        raise ConfigurationError(f"model {model!r} is not a Hugging Face file name: {_USAGE}")
    owner, repo, filename = match["owner"], match["repo"], match["file"]
    if any(".." in part or "--" in part for part in (owner, repo)):
        raise ConfigurationError(f"model {model!r} is not a Hugging Face file name ('..' and '--' are not allowed "
                                 f"in OWNER or REPO): {_USAGE}")
    parts = filename.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigurationError(f"model {model!r}: the file's path in the repository has an empty, '.' or '..' "
                                 f"part: {_USAGE}")
    if not filename.lower().endswith(".gguf"):
        raise ConfigurationError(f"model {model!r} does not name a .gguf file: {_USAGE}")
    return HubFile(f"{owner}/{repo}", filename)


def check_hub_name(model: str) -> HubFile:
    """Refuse, without any request, a hub name that cannot work: malformed, huggingface_hub missing, or offline
    (`HF_HUB_OFFLINE`) with the file not in the cache."""
    file = parse_hub_name(model)
    hub = _hub_module(model)
    if _offline() and not isinstance(_cached_path(hub, file), str):
        raise ConfigurationError(_not_cached_offline(file))
    return file


def download_hub_model(model: str) -> HubModel:
    """The GGUF named `model` (`hf:...`) in the local hub cache, downloaded first when it is not there, and the
    repository's tokenizer.json beside it when the repository has one."""
    file = parse_hub_name(model)
    hub = _hub_module(model)
    gguf = _download(hub, file)
    return HubModel(gguf, _optional_download(hub, file.beside(TOKENIZER_FILE)))


def _hub_module(model: str) -> Any:
    """huggingface_hub, imported on first use (it reads HF_HUB_OFFLINE, HF_HUB_CACHE and HF_HOME then)."""
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigurationError(f"model {model!r} is on the Hugging Face Hub; downloading it needs the "
                                 f"huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def _download(hub: Any, file: HubFile) -> Path:
    from huggingface_hub import errors

    try:
        return Path(hub.hf_hub_download(file.repo_id, file.filename))
    except errors.LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        raise ConfigurationError(_not_cached_offline(file) if _offline() else
                                 f"{file}: the Hugging Face Hub cannot be reached and the file is not in the cache "
                                 f"({_cache_dir()}); check the network (or HF_ENDPOINT) and try again") from None
    except errors.GatedRepoError:
        raise ConfigurationError(f"{file}: the repository is gated; accept its terms on huggingface.co and log in "
                                 "(hf auth login, or set HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise ConfigurationError(f"{file}: no repository {file.repo_id!r} on the Hugging Face Hub (or it is "
                                 "private: log in with hf auth login, or set HF_TOKEN)") from None
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError):
        raise ConfigurationError(f"{file}: the repository {file.repo_id!r} has no file {file.filename!r}; check "
                                 "the file name in its 'Files' tab") from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as exc:
        raise ConfigurationError(f"{file}: the download failed: {_first_line(exc)}") from None


def _optional_download(hub: Any, file: HubFile) -> Path | None:
    """A companion file, or None when the repository has none (or it cannot be had now): never an error."""
    try:
        return _download(hub, file)
    except ConfigurationError as exc:
        logger.debug("no %s beside the model: %s", file.filename, exc)
        return None


def _cached_path(hub: Any, file: HubFile) -> object:
    """The file's path in the cache (a str), or something else when it is not there (huggingface_hub's API)."""
    return hub.try_to_load_from_cache(file.repo_id, file.filename)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _not_cached_offline(file: HubFile) -> str:
    return (f"{file}: not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set; download it "
            "once with the network on, or point HF_HUB_CACHE (or HF_HOME) at the cache that holds it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
