"""An SR built once per structure by highdicom, then copied and filled with each image's values.

highdicom's SR constructor deep-copies the content tree, parses it back into typed items and
searches it for the references it must list as evidence: about three quarters of the CPU an SR
costs, the same work for every image with the same tree shape. It also leaves every element
decoded, so writing the SR encodes each one again. A :class:`Template` keeps highdicom's SR
for one shape as bytes; :meth:`Template.instance` reads them back (elements stay encoded until
touched, and are written as read) and :meth:`Template.fill` replaces the content items whose
values differ per image with items highdicom built for that image. The caller fills the
attributes outside the content tree (:func:`evidence`, :func:`copy_patient_and_study`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from io import BytesIO

from highdicom._standard_utils import (  # what SOPClass.copy_patient_and_study_information reads
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from highdicom.sr.utils import _create_references  # what collect_evidence groups the evidence with
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

#: A content item's identity in the tree: its value type and concept name (scheme, code).
Slot = tuple[str, str, str]

_CONTENT_SEQUENCE = Tag("ContentSequence")


def slot_of(item: Dataset) -> Slot:
    name = item.ConceptNameCodeSequence[0]
    code = name.get("CodeValue") or name.get("LongCodeValue") or name.get("URNCodeValue")
    return str(item.ValueType), str(name.CodingSchemeDesignator), str(code)


def _items(content: Sequence[Dataset], path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], Dataset]]:
    for index, item in enumerate(content):
        yield (*path, index), item
        if _CONTENT_SEQUENCE in item:
            yield from _items(item.ContentSequence, (*path, index))


@dataclass(frozen=True)
class Template:
    """One SR shape: highdicom's dataset as bytes and where each per-image item sits in it."""

    body: bytes  # the dataset without its File Meta Information, Explicit VR Little Endian
    file_meta: FileMetaDataset
    slots: dict[Slot, tuple[int, ...]]  # index path from the root's Content Sequence

    @classmethod
    def from_dataset(cls, sr: Dataset, per_image: Sequence[Dataset]) -> Template | None:
        """``sr`` as a template whose ``per_image`` items :meth:`fill` replaces; None when an
        item's slot is not found exactly once in the tree."""
        wanted = {slot_of(item) for item in per_image}
        found: dict[Slot, list[tuple[int, ...]]] = defaultdict(list)
        for path, item in _items(sr.ContentSequence):
            if (slot := slot_of(item)) in wanted:
                found[slot].append(path)
        if len(wanted) != len(per_image) or any(len(found[slot]) != 1 for slot in wanted):
            return None
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, sr)
        return cls(fp.getvalue(), sr.file_meta, {slot: paths[0] for slot, paths in found.items()})

    def instance(self, sop_instance_uid: str) -> Dataset:
        """A fresh copy of the SR, with its File Meta Information for ``sop_instance_uid``."""
        ds = read_dataset(BytesIO(self.body), is_implicit_VR=False, is_little_endian=True)
        meta = FileMetaDataset()
        for element in self.file_meta:  # the template's elements are shared: set new ones only
            if element.keyword not in ("MediaStorageSOPInstanceUID", "FileMetaInformationGroupLength"):
                meta[element.tag] = element
        # As highdicom's SOPClass does: the group length follows the instance UID's length.
        meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        fp = DicomBytesIO()
        write_file_meta_info(fp, meta, enforce_standard=True)
        meta.FileMetaInformationGroupLength = len(fp.getvalue())
        ds.file_meta = meta
        return ds

    def fill(self, ds: Dataset, per_image: Sequence[Dataset]) -> bool:
        """Give each of the template's per-image items in ``ds`` the elements of the item with
        its slot in ``per_image`` (its content, if any, stays); False, ``ds`` untouched, when the
        slots differ from the template's."""
        items = {slot_of(item): item for item in per_image}
        if items.keys() != self.slots.keys():
            return False
        for slot, path in self.slots.items():
            target = ds
            for index in path:
                target = target.ContentSequence[index]
            fresh = items[slot]
            for tag in set(target.keys()) - set(fresh.keys()) - {_CONTENT_SEQUENCE}:
                del target[tag]
            for element in fresh:
                if element.tag != _CONTENT_SEQUENCE:
                    target[element.tag] = element
        return True


def evidence(instances: Sequence[Dataset]) -> list[Dataset]:
    """Current Requested Procedure Evidence Sequence items for ``instances`` of one study, as
    highdicom's ``collect_evidence`` groups them (by series, duplicates once)."""
    groups: defaultdict[tuple[str, str], list[Dataset]] = defaultdict(list)
    seen: set[str] = set()
    for instance in instances:
        if instance.SOPInstanceUID in seen:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = instance.SOPClassUID
        item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
        groups[(instance.StudyInstanceUID, instance.SeriesInstanceUID)].append(item)
        seen.add(instance.SOPInstanceUID)
    return _create_references(groups)  # type: ignore[arg-type]  # its items are Datasets


@cache
def patient_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The root attributes of the Patient and Study modules of ``sop_class_uid``'s IOD: those
    highdicom copies from the source (``SOPClass.copy_patient_and_study_information``).

    Raises:
        KeyError: an SOP class highdicom does not know, as highdicom raises.
    """
    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    tags = []
    for ie in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] == ie:
                tags += [Tag(str(a["keyword"])) for a in attributes[module["key"]] if not a["path"]]
    return tuple(tags)


def copy_patient_and_study(ds: Dataset, source: Dataset) -> None:
    """Copy the source's Patient and Study attributes into ``ds``, the element objects
    themselves, as highdicom does."""
    for tag in patient_study_tags(str(source.SOPClassUID)):
        if tag in source:
            ds.add(source[tag])


class LRU:
    """A bounded least-recently-used map, safe to share between build threads."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Template | None] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, key: Hashable, build: Callable[[], Template | None]) -> Template | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()  # outside the lock: two threads may build the same one, both are right
        with self._lock:
            self.builds += 1
            self._items[key] = value
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.builds = 0
