"""Building model directories: each repo part from the first source that has it intact, with
retries and backoff on transient errors, in a staging directory swapped in whole once complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BuildError, CorruptFileError, UnavailableError, auth_hint, is_transient
from builder.layout import PROMPT_REPO, ModelSpec, Part, plan_part, specs_for
from builder.manifest import check_complete, new_manifest, recipe_id, write_manifest
from builder.sources import Snapshot, Source, repo_folder
from builder.transfer import transfer

log = logging.getLogger("download_models")


@dataclass
class BuildOptions:
    """Where to build, from which sources, and how hard to try."""

    models_dir: Path
    sources: list[Source]
    revisions: dict[str, str] = field(default_factory=dict)
    verify: bool = False
    force: bool = False
    retries: int = 5
    backoff_s: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    delete_downloads: Path | None = None  # a download cache to clean after each model
    prompt_model: str = PROMPT_REPO  # the prompt family's LLM repo (PROMPT_MODEL)


def build(families: Iterable[str], options: BuildOptions) -> dict[str, str]:
    """Build every model directory the families need; return name -> 'built' or 'skipped'."""
    options.models_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    for spec in specs_for(families, options.prompt_model):
        recipe = recipe_id(spec, options.revisions)
        target = options.models_dir / spec.name
        reason = "rebuild forced" if options.force else check_complete(target, recipe, options.verify)
        if reason is None:
            log.info("%s: complete in %s, skipped", spec.name, target)
            results[spec.name] = "skipped"
            continue
        if reason.startswith("no manifest"):
            log.warning("%s: %s exists without a manifest and will be replaced", spec.name, target)
        log.info("%s: building (%s)", spec.name, reason)
        started = time.monotonic()
        _build_model(spec, recipe, target, options)
        log.info("%s: built in %.1f s", spec.name, time.monotonic() - started)
        results[spec.name] = "built"
        if options.delete_downloads is not None:
            for part in spec.parts:
                shutil.rmtree(options.delete_downloads / repo_folder(part.repo), ignore_errors=True)
    return results


def _build_model(spec: ModelSpec, recipe: str, target: Path, options: BuildOptions) -> None:
    """Write ``spec`` into a staging directory and swap it in for ``target`` once complete."""
    staging = target.with_name(f".staging-{spec.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    manifest = new_manifest(spec, recipe)
    try:
        for part in spec.parts:
            revision = options.revisions.get(part.repo, "main")
            snap, files = _build_part(part, revision, staging, options)
            manifest["sources"][part.repo] = {
                "revision": revision,
                "commit": snap.commit,
                "from": snap.source.label,
            }
            manifest["files"].update(files)
        for rel, link_target in spec.links:
            (staging / rel).symlink_to(link_target, target_is_directory=True)
            manifest["links"][rel] = link_target
        write_manifest(staging, manifest)
        os.chmod(staging, 0o755)
        old = target.with_name(f".old-{spec.name}")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists() or target.is_symlink():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_part(
    part: Part, revision: str, staging: Path, options: BuildOptions
) -> tuple[Snapshot, dict[str, Any]]:
    """Write one repo's share of a model, trying each source in turn (with retries)."""
    problems: list[str] = []
    for source in options.sources:
        attempt = 0
        while True:
            attempt += 1
            written: list[Path] = []
            try:
                snap = source.snapshot(part.repo, revision)
                _check_same_as(part, snap, source, options)
                steps = plan_part(part, snap.files)
                source.fetch(snap, [step.src for step in steps])
                files: dict[str, Any] = {}
                unverified = []
                for step in steps:
                    written.append(staging / step.out)
                    files[step.out], verified = transfer(step, snap, staging)
                    if not verified:
                        unverified.append(step.src)
                if unverified:
                    log.warning(
                        "%s: %s has no size/hash to check %d file(s) against (%s)",
                        part.repo,
                        source.label,
                        len(unverified),
                        ", ".join(unverified[:3]),
                    )
                log.info("%s@%s: %d files from %s", part.repo, snap.commit[:12], len(steps), source.label)
                return snap, files
            except UnavailableError as err:
                problems.append(f"{source.label}: {err}")
                break
            except CorruptFileError as err:
                _remove(written)
                log.warning("%s: %s: corrupt file %s", part.repo, source.label, err)
                if not source.refetchable or attempt >= options.retries:
                    problems.append(f"{source.label}: corrupt file {err}")
                    break
                source.discard(snap, err.path)
            except Exception as err:
                _remove(written)
                if not is_transient(err):
                    problems.append(f"{source.label}: {type(err).__name__}: {err}{auth_hint(err)}")
                    break
                if attempt >= options.retries:
                    problems.append(f"{source.label}: gave up after {attempt} attempts: {err}")
                    break
                delay = min(options.backoff_s * 2 ** (attempt - 1), 60.0)
                log.warning(
                    "%s: %s: %s (attempt %d of %d), retrying in %.0f s",
                    part.repo,
                    source.label,
                    err,
                    attempt,
                    options.retries,
                    delay,
                )
                options.sleep(delay)
    raise BuildError(f"{part.repo}@{revision}: no source could provide it: " + "; ".join(problems))


def _check_same_as(part: Part, snap: Snapshot, source: Source, options: BuildOptions) -> None:
    """Raise BuildError unless ``part.same_as``'s folders hold the other repo's files exactly."""
    if part.same_as is None:
        return
    other_repo, folders = part.same_as
    other = source.snapshot(other_repo, options.revisions.get(other_repo, "main"))
    for folder in folders:
        mine, theirs = (
            {
                path: meta.sha256 or meta.git_sha1
                for path, meta in listing.items()
                if path.startswith(f"{folder}/")
            }
            for listing in (snap.files, other.files)
        )
        if not mine or mine != theirs or None in mine.values():
            raise BuildError(
                f"{part.repo}: its {folder}/ is not {other_repo}'s (file names or hashes differ), but the "
                f"worker shares one copy of it: check the repos' revisions"
            )


def _remove(paths: list[Path]) -> None:
    """Delete what a failed attempt wrote."""
    for path in paths:
        path.unlink(missing_ok=True)
