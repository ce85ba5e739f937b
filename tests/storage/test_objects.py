"""Committed folders on a real S3-compatible server (SeaweedFS on 127.0.0.1): publish, fetch, damage, abandon."""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
from pyarrow import fs as arrow_fs

from core.errors import CorruptDataError, PipelineError
from storage.atomic import write_json
from storage.folders import MANIFEST, FolderWriter, manifest_identity, read_manifest
from storage.layout import DataRoot
from storage.objects import GENERATION_PREFIX, ObjectStore

KIND, FORMAT = "example", 1


def s3_server_secret() -> str:
    return os.environ["AWS_SECRET_ACCESS_KEY"]


def committed_folder(layout: DataRoot, name: str, content: bytes = b"first") -> Path:
    """A committed folder of the working copy, with a file in a subfolder too."""
    folder = layout.root / "things" / name
    with FolderWriter(folder, KIND, FORMAT) as writer:
        (writer.work / "data.bin").write_bytes(content * 1000)
        (writer.work / "logs").mkdir()
        (writer.work / "logs" / "events.txt").write_text("epoch 1\n")
        writer.commit()
    return folder


def objects_under(store: ObjectStore, relative: str) -> list[str]:
    prefix = f"{store.base}/{relative}"
    infos = store.fs.get_file_info(arrow_fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path[len(prefix) + 1:] for info in infos if info.type == arrow_fs.FileType.File)


def is_committed(layout: DataRoot, folder: Path) -> bool:
    """True when the data root holds exactly the working copy's content of `folder`, intact by listing."""
    published = layout.committed(folder)
    return published is not None and manifest_identity(published) == manifest_identity(
        read_manifest(folder, KIND, FORMAT))


def test_a_published_folder_is_fetched_whole_into_another_working_copy(s3_root, tmp_path):
    here = DataRoot(s3_root, tmp_path / "here")
    folder = committed_folder(here, "a")
    here.publish(folder)

    there = DataRoot(s3_root, tmp_path / "there")
    copy = there.root / "things" / "a"
    assert there.fetch(copy)
    for name in ("data.bin", "logs/events.txt"):
        assert (copy / name).read_bytes() == (folder / name).read_bytes()
    assert read_manifest(copy, KIND, FORMAT) == read_manifest(folder, KIND, FORMAT)  # no store detail leaks in
    assert there.url(copy) == f"{s3_root}/things/a"
    generation = json.loads(there.store.read_bytes("things/a/" + MANIFEST))["generation"]
    assert objects_under(there.store, "things/a") == sorted(
        [MANIFEST, f"{generation}/data.bin", f"{generation}/logs/events.txt"]
    )


def test_publishing_the_same_content_again_uploads_nothing(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    before = objects_under(layout.store, "things/a")
    layout.publish(folder)
    assert objects_under(layout.store, "things/a") == before


def test_an_interrupted_upload_is_never_taken_for_a_folder_and_a_later_publish_removes_it(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    # What a crash before the manifest leaves: a generation's files, no manifest naming them.
    layout.store.put_file(folder / "data.bin", f"things/a/{GENERATION_PREFIX}abandoned/data.bin")
    assert layout.store.manifest("things/a") is None
    assert layout.committed(folder) is None
    assert not DataRoot(s3_root, tmp_path / "other").fetch(tmp_path / "other" / "things" / "a")

    layout.publish(folder)  # a generation this recent may be another machine's upload in progress: kept
    assert any("abandoned" in name for name in objects_under(layout.store, "things/a"))
    assert is_committed(layout, folder)

    layout.store.abandoned_after_seconds = 0  # as if it had been left for an hour
    layout.publish(committed_folder(layout, "a", b"newer"))
    assert not any("abandoned" in name for name in objects_under(layout.store, "things/a"))


def test_a_new_version_replaces_the_old_one_whole(s3_root, tmp_path):
    first = DataRoot(s3_root, tmp_path / "first")
    first.publish(committed_folder(first, "a", b"first"))
    reader = DataRoot(s3_root, tmp_path / "reader")
    copy = reader.root / "things" / "a"
    reader.fetch(copy)

    second = DataRoot(s3_root, tmp_path / "second")
    second.publish(committed_folder(second, "a", b"other"))
    assert reader.fetch(copy)  # the working copy follows the data root
    assert (copy / "data.bin").read_bytes() == b"other" * 1000
    generations = {name.split("/")[0] for name in objects_under(reader.store, "things/a") if name != MANIFEST}
    assert len(generations) == 1  # the old generation is gone


def test_a_damaged_object_is_refused_leaves_no_local_folder_and_is_taken_out_of_the_data_root(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    layout.publish(committed_folder(layout, "a"))
    manifest = layout.store.manifest("things/a")
    # Same size, other bytes, and the listing as it was: damage only the bytes can show.
    layout.store.upload(layout.root / "things" / "a", "things/a", manifest)
    damaged = layout.store.manifest("things/a")
    layout.store.write_bytes(f"things/a/{damaged['generation']}/data.bin", b"X" * 5000)
    listed = layout.store._listing("things/a", damaged["generation"])
    layout.store.write_bytes("things/a/" + MANIFEST, json.dumps(
        {**damaged, "listed": {name: mtime for name, (_, mtime) in listed.items()}}).encode())
    assert layout.committed(layout.root / "things" / "a") is not None  # the listing cannot tell

    reader = DataRoot(s3_root, tmp_path / "reader")
    copy = reader.root / "things" / "a"
    with pytest.raises(CorruptDataError, match=r"data\.bin does not match the size and sha256 recorded .*taken out "
                                               r"of it; rerun, and the stage that writes it runs again"):
        reader.fetch(copy)
    assert not copy.exists()
    assert [path for path in copy.parent.iterdir() if path.name != ".locks"] == []  # nor a temporary one
    assert layout.store.manifest("things/a") is None  # the next run rebuilds it


def test_an_object_written_again_after_its_folder_was_committed_is_damage_the_listing_shows(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    generation = layout.store.manifest("things/a")["generation"]
    time.sleep(1.1)  # the store's listing times have whole seconds
    layout.store.write_bytes(f"things/a/{generation}/data.bin", b"X" * 5000)  # same size, other bytes
    manifest, damage = layout.commit_state(folder)
    assert manifest is None and damage == f"{s3_root}/things/a/{generation}/data.bin was written again after its " \
        "folder was committed"
    assert layout.publish(folder) == damage  # the working copy is intact: published again, as a new generation
    assert is_committed(layout, folder) and layout.store.manifest("things/a")["generation"] != generation
    assert not any(name.startswith(generation) for name in objects_under(layout.store, "things/a"))


def test_a_missing_object_means_the_folder_is_not_there(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    generation = layout.store.manifest("things/a")["generation"]
    layout.store.fs.delete_file(f"{layout.store.base}/things/a/{generation}/data.bin")
    assert layout.committed(folder) is None
    assert not is_committed(layout, folder)
    assert "data.bin is missing" in layout.publish(folder)  # a republish repairs it, and says what it repaired
    assert is_committed(layout, folder)


def test_a_folder_that_changes_in_place_is_described_when_published(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    backup = layout.root / "models" / "m.backup"
    (backup / "epoch-0001").mkdir(parents=True)
    write_json(backup / "run.json", {"parameters": 1})
    (backup / "epoch-0001" / "weights.h5").write_bytes(b"w" * 100)
    layout.publish(backup, describe=True)
    other = DataRoot(s3_root, tmp_path / "other")
    assert other.fetch(other.root / "models" / "m.backup")
    assert (other.root / "models" / "m.backup" / "epoch-0001" / "weights.h5").read_bytes() == b"w" * 100
    layout.discard(backup)
    assert layout.store.manifest("models/m.backup") is None and objects_under(layout.store, "models/m.backup") == []


def test_a_damaged_working_copy_is_fetched_again(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    (folder / "data.bin").write_bytes(b"X" * 5000)  # same size, other bytes, manifest untouched
    assert layout.fetch(folder)
    assert (folder / "data.bin").read_bytes() == b"first" * 1000


def test_a_missing_bucket_is_named(s3_server, tmp_path):
    layout = DataRoot("s3://no-such-bucket/data", tmp_path / "copy")
    with pytest.raises(PipelineError, match=r"The bucket 'no-such-bucket' of s3://no-such-bucket/data does not exist"):
        layout.fetch(layout.splits("anything"))


def test_a_store_pickles_without_its_keys_and_works_where_it_is_unpickled(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    layout.publish(committed_folder(layout, "a"))
    data = pickle.dumps(layout)
    assert s3_server_secret().encode() not in data
    assert pickle.loads(data).committed(layout.root / "things" / "a") is not None
    assert pickle.loads(data) == layout


def test_wrong_credentials_give_one_line_naming_the_variables(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    layout = DataRoot(s3_root, tmp_path / "copy")
    with pytest.raises(PipelineError, match=r"refused these credentials for s3://notmnist/.*AWS_SECRET_ACCESS_KEY") as raised:
        layout.publish(committed_folder(layout, "a"))
    assert "\n" not in str(raised.value)


def test_a_local_data_root_publishes_and_fetches_nothing(tmp_path):
    layout = DataRoot(tmp_path / "data")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    layout.discard(folder)
    assert layout.store is None and layout.fetch(folder) and layout.url(folder) == str(folder)
    assert manifest_identity(layout.committed(folder)) == manifest_identity(read_manifest(folder, KIND, FORMAT))


def test_a_location_without_a_bucket_is_refused():
    with pytest.raises(PipelineError, match="names no bucket"):
        DataRoot("s3://")


def test_a_sweep_removes_uploads_no_manifest_names_once_they_are_old_and_never_a_named_one(s3_root, tmp_path):
    layout = DataRoot(s3_root, tmp_path / "copy")
    folder = committed_folder(layout, "a")
    layout.publish(folder)
    named = layout.store.manifest("things/a")["generation"]
    # Cut short: one under a committed folder, one of a folder that never got its manifest.
    layout.store.put_file(folder / "data.bin", f"things/a/{GENERATION_PREFIX}cut/data.bin")
    layout.store.put_file(folder / "data.bin", f"things/b/{GENERATION_PREFIX}cut/data.bin")
    assert layout.store.sweep() == []  # recent: perhaps another machine's upload in progress
    layout.store.abandoned_after_seconds = 0
    assert sorted(layout.store.sweep()) == [f"{s3_root}/things/a/{GENERATION_PREFIX}cut",
                                            f"{s3_root}/things/b/{GENERATION_PREFIX}cut"]
    assert objects_under(layout.store, "things/b") == []
    assert {name.split("/")[0] for name in objects_under(layout.store, "things/a")} == {named, MANIFEST}
    assert is_committed(layout, folder)


def test_a_local_data_root_that_cannot_be_written_is_one_line_saying_so(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(PipelineError, match=r"Cannot write to the data root .*a-file/data: .*Choose a folder") as raised:
        DataRoot(tmp_path / "a-file" / "data").check_writable()  # what a read-only folder gives, even to root
    assert "\n" not in str(raised.value)
