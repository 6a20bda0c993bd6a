"""Sharing adapters on the Hugging Face Hub: push a saved adapter, load one by its Hub id.

``huggingface_hub`` is optional (``pip install 'inti-adapters[hub]'``) and imported only when a
Hub call is made; a local folder is read exactly as before.

- Loading: :func:`resolve_adapter` turns ``"org/name"`` into a local folder with
  ``snapshot_download`` (only the adapter's files: config, weights, ``peft/``, card), honouring
  ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE=1`` (the local
  cache only). The snapshot is complete on disk before ``load_pretrained`` reads a byte, so its
  validate-then-apply guarantee holds for Hub ids as for folders. A path that exists is always
  local; a string that is not ``namespace/name`` is always a path.
- Pushing: :meth:`PushToHubMixin.push_to_hub` (``model.push_to_hub("org/name")``) or
  ``save_pretrained(dir, push_to_hub=True, repo_id=...)``: the repository is created if needed
  (``private``), the card names the repository, and one commit uploads the adapter's files and
  deletes a stale backbone file or ``peft/`` part of an earlier push.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ._format import ADAPTER_WEIGHTS_NAME, BACKBONE_WEIGHTS_NAME, CARD_NAME, CONFIG_NAME, PEFT_SUBFOLDER
from ._version import __version__
from .card import CardInfo, card_info, write_card

__all__ = ["ADAPTER_PATTERNS", "PushToHubMixin", "check_save_options", "finish_save", "is_hub_id", "resolve_adapter"]

#: The files of a saved adapter, as ``huggingface_hub`` patterns (downloads and uploads).
ADAPTER_PATTERNS = [CONFIG_NAME, ADAPTER_WEIGHTS_NAME, BACKBONE_WEIGHTS_NAME, f"{PEFT_SUBFOLDER}/*", CARD_NAME]
_STALE_PATTERNS = [BACKBONE_WEIGHTS_NAME, f"{PEFT_SUBFOLDER}/*"]  # removed on push unless uploaded again
PUSH_OPTIONS = ("repo_id", "token", "private", "revision", "commit_message", "create_pr")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_INSTALL = "pip install 'inti-adapters[hub]' (huggingface_hub)"


def is_hub_id(name: Any) -> bool:
    """True for a string shaped like a Hub repository id, ``namespace/name``."""
    return (isinstance(name, str) and _REPO_ID.fullmatch(name) is not None and ".." not in name
            and "--" not in name and not name.endswith(".git"))


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(f"the Hugging Face Hub needs huggingface_hub: {_INSTALL}") from e
    return huggingface_hub


def resolve_adapter(path_or_id: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                    force_download: bool = False) -> Path:
    """The local folder of a saved adapter: ``path_or_id`` itself, or a complete Hub snapshot of it.

    Raises:
        ValueError: Hub options given with a local path.
        FileNotFoundError: Neither a local path nor a repository that could be fetched (the
            reason is chained: offline without a cached snapshot, unknown repository or revision,
            no access, huggingface_hub missing).
    """
    local = Path(path_or_id).expanduser()
    if local.exists() or not is_hub_id(path_or_id):
        given = {k: v for k, v in (("revision", revision), ("token", token), ("cache_dir", cache_dir)) if v is not None}
        if given:
            raise ValueError(f"{sorted(given)} apply to Hub ids ('namespace/name'); {str(path_or_id)!r} is a local path")
        return local
    try:
        hf = _hf()
    except ImportError as e:
        raise FileNotFoundError(f"{path_or_id!r} is not a local folder; to load it from the Hub: {_INSTALL}") from e
    options: dict[str, Any] = {"revision": revision, "token": token, "cache_dir": cache_dir,
                               "force_download": force_download, "allow_patterns": ADAPTER_PATTERNS,
                               "library_name": "inti_adapters", "library_version": __version__}
    if local_files_only is not None:
        options["local_files_only"] = local_files_only
    try:
        return Path(hf.snapshot_download(str(path_or_id), **options))
    except Exception as e:  # offline without a cache, unknown repo / revision, no access: say which
        raise FileNotFoundError(
            f"{path_or_id!r} is not a local folder, and the Hugging Face Hub repository could not be fetched "
            f"(revision {revision or 'main'}{', offline' if _offline(hf) else ''}): {type(e).__name__}: {e}"
        ) from e


def _offline(hf: Any) -> bool:
    return bool(getattr(getattr(hf, "constants", None), "HF_HUB_OFFLINE", False))


def check_save_options(card: Any, push_to_hub: bool, options: dict[str, Any]) -> None:
    """Refuse a bad card, unknown Hub options and Hub options without ``push_to_hub`` (before anything is written)."""
    if not isinstance(card, bool):
        card_info(card)
    unknown = sorted(set(options) - set(PUSH_OPTIONS))
    if unknown:
        raise TypeError(f"save_pretrained got unknown options {unknown}; the Hub options are {list(PUSH_OPTIONS)}")
    if options and not push_to_hub:
        raise ValueError(f"{sorted(options)} are options of push_to_hub=True; nothing is pushed without it")


def _create_repo(repo_id: str, token: Any, private: bool | None, revision: str | None, create_pr: bool) -> tuple[Any, str]:
    api = _hf().HfApi(token=token, library_name="inti_adapters", library_version=__version__)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone lands in the user's namespace
    if revision not in (None, "main") and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api, repo_id


def finish_save(directory: str | os.PathLike, model: nn.Module, *, card: CardInfo | dict[str, Any] | bool | None,
                peft_model: nn.Module | None, peft_order: str, push_to_hub: bool = False, repo_id: str | None = None,
                token: Any = None, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False) -> Any:
    """The end of ``save_pretrained``: write the card; with ``push_to_hub``, create the repository,
    name it in the card and upload the folder's adapter files in one commit (returns its ``CommitInfo``)."""
    if not push_to_hub:
        write_card(directory, model, card, peft_model=peft_model, peft_order=peft_order)
        return None
    api, repo_id = _create_repo(repo_id or Path(directory).resolve().name, token, private, revision, create_pr)
    if card is not False:
        card = card_info(None if card is True else card, repo_id=repo_id)
    write_card(directory, model, card, peft_model=peft_model, peft_order=peft_order)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload InTI adapter with inti_adapters",
                             create_pr=create_pr, allow_patterns=ADAPTER_PATTERNS, delete_patterns=_STALE_PATTERNS)


class PushToHubMixin:
    """``push_to_hub`` for a model with ``save_pretrained(directory, ..., push_to_hub=True, **options)``."""

    def push_to_hub(self, repo_id: str, *, save_backbone: bool | None = None,
                    card: CardInfo | dict[str, Any] | bool | None = None, token: str | bool | None = None,
                    private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                    create_pr: bool = False) -> Any:
        """Save into a temporary folder and upload it to the Hub repository ``repo_id`` (created if needed).

        Args:
            repo_id: ``"namespace/name"`` (or ``"name"`` for your own namespace).
            save_backbone, card: As in ``save_pretrained``.
            token: A Hub token; default: the one ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).
            private: Create the repository private (an existing one keeps its visibility).
            revision: Branch to push to (created from main if missing).
            commit_message, create_pr: As in ``huggingface_hub.HfApi.upload_folder``.

        Returns:
            ``huggingface_hub``'s ``CommitInfo`` of the upload.
        """
        with tempfile.TemporaryDirectory(prefix="inti_push_") as folder:
            return self.save_pretrained(folder, save_backbone=save_backbone, card=card,  # type: ignore[attr-defined]
                                        push_to_hub=True, repo_id=repo_id, token=token, private=private,
                                        revision=revision, commit_message=commit_message, create_pr=create_pr)
