"""Model (and dataset) files the hub serves: downloaded with `X-SDK-Token`, verified against their sha256 and
cached under it (§11); concurrent tasks of one model share one download and one loaded model."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from .log import DeviceLog
from .runners import Runner, load_runner

_CHUNK = 1 << 20


def sha256_hex(checksum: str) -> str:
    """`sha256:<hex>` -> `<hex>`; anything else is refused (the cache is keyed by it)."""
    match = re.fullmatch(r"sha256:([0-9a-fA-F]{64})", checksum)
    if not match:
        raise ValueError(f"unsupported model checksum {checksum[:100]!r} (expected sha256:<64 hex>)")
    return match.group(1).lower()


class ModelStore:
    def __init__(self, server: str, cache_dir: Path, token: Callable[[], Optional[str]], log: DeviceLog, threads: int, cuda: bool) -> None:
        self.server = server.rstrip("/")
        self.cache_dir = cache_dir
        self.token = token
        self.log = log
        self.threads = threads
        self.cuda = cuda
        self._files: Dict[str, asyncio.Future] = {}
        self._runners: Dict[str, asyncio.Future] = {}

    async def runner(self, model: Mapping[str, Any], on_bytes: Callable[[int], None]) -> Runner:
        """The loaded model; `on_bytes` counts the bytes downloaded on this call's behalf."""
        hex_ = sha256_hex(model["checksum"])
        loading = self._runners.get(hex_)
        if loading is None:
            loading = asyncio.ensure_future(self._load(model, hex_, on_bytes))
            self._runners[hex_] = loading
        try:
            return await asyncio.shield(loading)
        except BaseException:
            if self._runners.get(hex_) is loading:
                del self._runners[hex_]  # a failed load is not kept: the next task tries again
            raise

    async def file(self, ref: Mapping[str, Any], on_bytes: Callable[[int], None] = lambda n: None) -> Path:
        """The cached file of a model or dataset (`id`, `checksum`, `download_path`), downloading it once."""
        hex_ = sha256_hex(ref["checksum"])
        target = self.cache_dir / hex_
        if target.is_file():
            return target
        download = self._files.get(hex_)
        if download is None:
            download = asyncio.ensure_future(asyncio.to_thread(self._download, ref, hex_, target, on_bytes))
            self._files[hex_] = download
            download.add_done_callback(lambda _: self._files.pop(hex_, None))
        return await asyncio.shield(download)

    async def _load(self, model: Mapping[str, Any], hex_: str, on_bytes: Callable[[int], None]) -> Runner:
        path = await self.file(model, on_bytes)
        runner = await asyncio.to_thread(load_runner, path, model["format"], self.threads, self.cuda)
        if self.cuda and not runner.gpu:
            self.log.warn(f"CUDA unavailable for model {model['id']}: running it on CPU")
        return runner

    def _download(self, ref: Mapping[str, Any], hex_: str, target: Path, on_bytes: Callable[[int], None]) -> Path:
        """A token becomes valid once the hub's read model has it, a moment after the first `registered`
        (§11): a 401 is tried again twice, half a second apart."""
        for attempt in range(3):
            try:
                return self._download_once(ref, hex_, target, on_bytes)
            except urllib.error.HTTPError as error:
                if error.code != 401 or attempt == 2:
                    raise RuntimeError(f"model {ref['id']} download failed: GET {ref['download_path']} answered HTTP {error.code}") from None
            time.sleep(0.5)
        raise AssertionError("unreachable")

    def _download_once(self, ref: Mapping[str, Any], hex_: str, target: Path, on_bytes: Callable[[int], None]) -> Path:
        """Streams to a temp file while hashing; moved into place only once the checksum matches."""
        if not str(ref["download_path"]).startswith("/"):  # a path on the hub, never another host (the token goes with it)
            raise ValueError(f"model {ref['id']}: download_path {str(ref['download_path'])[:100]!r} is not a path on the hub")
        url = f"{self.server}{ref['download_path']}"
        token = self.token()
        self.log.info(f"downloading model {ref['id']} from {url}")
        request = urllib.request.Request(url, headers={"X-SDK-Token": token} if token else {})
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
        digest = hashlib.sha256()
        size = 0
        try:
            with urllib.request.urlopen(request, timeout=60) as response, open(temp, "wb") as out:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    on_bytes(len(chunk))
            if digest.hexdigest() != hex_:
                raise ValueError(f"model {ref['id']} checksum mismatch: expected sha256:{hex_}, downloaded sha256:{digest.hexdigest()}")
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        self.log.info(f"model {ref['id']} downloaded ({size} bytes) to {target}")
        return target
