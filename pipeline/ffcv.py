"""FFCV backend: a .beton writer, and a field decoder that decodes each JPEG once and cuts every view of a
``ViewSpec`` from it (``ViewsDecoder``; a ``PairSpec``'s two views are its ``view_spec``).

Stock FFCV gets two views by running two decoder pipelines over the same field, decoding every JPEG twice, and
its random-crop decoder keeps the window it chose to itself (ffcv #395). ``ViewsDecoder`` decodes once, draws
the views with the project's Numba sampler (``geometry.draw_views``: RandomResizedCrop + flip and the spec's
overlap rules) and cuts them with ``resize.cut_views``, the reference loader's cutter.

FFCV's compiled decoders only see the batch's sample indices, so each sample's seed is derived from
``(seed, sample index, an order-sensitive key of the batch)``. The iterator derives the same seeds from the
batch's ``index`` field and reruns the same sampler, which rebuilds every window and flip exactly, so the
decoder needs no side channel. With RANDOM / QUASI_RANDOM order the batches, and hence the views, change every
epoch; FFCV's ordering is seeded, so the same seed gives the same batches. (SEQUENTIAL order repeats the
views every epoch: it is meant for evaluation.)

``import densessl.pipeline.ffcv`` needs the ``ffcv`` extra (FFCV 1.0.2 builds against libturbojpeg and OpenCV).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from numba import njit, types

try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.loader import Loader, OrderOption
    from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the FFCV backend needs FFCV 1.0.2: run `make setup` (installs libturbojpeg0-dev, "
                      "libopencv-dev, pkg-config, then pip install -e '.[ffcv]')") from err

from .contract import Position, pack_views, unpack_views
from .correspondence import splitmix64
from .folder import MAX_PIXELS, BadImage, read_first_readable
from .index import index_of
from .geometry import draw_views
from .owned import NotOurs
from .resize import cut_views
from .views import ViewSpec


def _readonly(dtype, ndim: int) -> types.Array:
    return types.Array(dtype, ndim, "C", readonly=True)


# The FFCV release whose memory managers ``use_private_state_types`` mends (the one ``constraints.txt`` pins).
MENDED_FFCV = "1.0.2"


def _os_cache_reader(self):
    """The OS-cache manager's reader (a sample's bytes from the memory-mapped file, by its address), declared
    with the read-only types of ``use_private_state_types``: FFCV's declares its result as the shared type it had
    marked read-only."""
    def read(address, state):
        return state[0][address:address + state[2][np.searchsorted(state[1], address)]]
    return Compiler.compile(read, _readonly(types.uint8, 1)(types.uint64, self.state_type))


def use_private_state_types() -> None:
    """Give FFCV's memory managers state types of their own; call before building any FFCV ``Loader`` in the
    process (idempotent; ``FfcvLoader`` calls it).

    FFCV 1.0.2's managers declare their state read-only by setting ``mutable = False`` on Numba's shared, interned
    array types (``nb.uint8[::1]`` is the one ``array(uint8, 1d, C)`` of the process). That turns every such array
    read-only in every later compilation and changes the type's hash: DALI's numba operators then failed to
    compile (``Cannot modify readonly array`` in ``resize_crop_aa``, depending on what the process had compiled
    before), and Numba's dispatcher finaliser raised KeyError as a benchmark ended. The same state types, built
    as their own read-only types (a writable array converts to one safely), replace them. Gated on the version:
    another FFCV is left as it is, with a warning, since its managers may declare their state otherwise."""
    global _MENDED
    if _MENDED:
        return
    found = importlib.metadata.version("ffcv")
    if found != MENDED_FFCV:
        warnings.warn(f"FFCV {found}: its memory managers are used as they are (the read-only state type fix is "
                      f"for FFCV {MENDED_FFCV}, the tested release); a Numba 'readonly array' error in DALI's "
                      "operators after FFCV ran points here")
    else:
        OSCacheManager.state_type = property(
            lambda self: types.Tuple([_readonly(types.uint8, 1), types.uint64[::1], types.uint64[::1]]))
        OSCacheManager.compile_reader = _os_cache_reader
        ProcessCacheManager.state_type = property(
            lambda self: types.Tuple([_readonly(types.uint8, 2), _readonly(types.uint64, 1),
                                      _readonly(types.uint64, 1), _readonly(types.uint32, 1)]))
    _MENDED = True


_MENDED = False

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
          "sequential": OrderOption.SEQUENTIAL}


class _Samples:
    """ImageFolder as FFCV's indexed dataset: (HxWx3 uint8 image, label, index).

    An unreadable file is stored as the next readable one (its image, label and index, so the sample is a true
    duplicate) and listed in ``skip_log``: the .beton keeps one record per file and never holds a broken image.
    """

    def __init__(self, files, labels, skip_log: Path):
        self.files, self.labels, self.skip_log = files, labels, skip_log

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        j, pixels = read_first_readable(self.files, i, str(self.skip_log), warn=False)  # listed, not warned
        return pixels, int(self.labels[j]), j


def write_beton(data, out: str | Path, max_resolution: int | None = None, jpeg_quality: int = 90,
                write_mode: str = "jpg", workers: int = 2, max_bad_images: int = 100, option: str = "out") -> Path:
    """Write an ImageFolder (or the embedded set's ``train`` folder) to ``out`` with fields image, label, index.

    ``out`` is new, or a .beton this function wrote (its fields): anything else is refused (``owned.NotOurs``,
    naming ``option``) before the folder is scanned.
    ``max_resolution`` shrinks images whose longer side exceeds it (geometry then refers to the stored image).
    Unreadable files are replaced by their next readable neighbour and listed in ``OUT.skipped.txt``; more than
    ``max_bad_images`` of them is an error. FFCV's writer shows a progress bar.
    """
    out = Path(out)
    if out.exists() and not _written_by_us(out):  # FFCV's writer truncates whatever the path holds
        raise NotOurs(f"{option}={out} exists and was not written by densessl (no .beton of ours); choose a new "
                      "file")
    folder = index_of(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip_log = out.with_name(out.name + ".skipped.txt")
    skip_log.unlink(missing_ok=True)
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    samples = _Samples(folder.paths, folder.labels, skip_log)
    DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(samples)
    bad = {line.split("\t")[0] for line in skip_log.read_text().splitlines()} if skip_log.exists() else set()
    if bad:
        print(f"{len(bad)} unreadable file(s) replaced by their neighbours; listed in {skip_log}")
    if len(bad) > max_bad_images:
        out.unlink()
        raise RuntimeError(f"{len(bad)} unreadable files (> max_bad_images={max_bad_images}), listed in {skip_log}")
    return out


FIELDS = ("image", "label", "index")  # what write_beton stores, in order: its files' mark


def _written_by_us(path: Path) -> bool:
    """Whether ``path`` reads as a .beton with ``write_beton``'s fields (a file of any other kind is not ours)."""
    try:
        return path.is_file() and tuple(Reader(str(path)).field_names) == FIELDS
    except Exception:  # FFCV's reader on bytes that are no .beton: numpy and struct errors of every kind
        return False


def largest_image(heights, widths, source: str = "the .beton") -> int:
    """Pixels of the largest image a .beton's metadata declares, for buffers sized per sample: the largest h*w,
    not the tallest times the widest (one 16000x100 and one 100x16000 image would make that 768 MB a sample).

    The header is trusted with an allocation, so it is checked first: an image that is empty or over
    ``MAX_PIXELS`` (``decode_rgb`` refuses those, so ``write_beton`` never stores one) means a damaged or foreign
    file, refused in one line naming it, the sample and the size."""
    heights, widths = np.asarray(heights, np.uint64), np.asarray(widths, np.uint64)
    pixels = heights * widths
    bad = np.flatnonzero((pixels > MAX_PIXELS) | (pixels == 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{source}: sample {i} declares a {widths[i]}x{heights[i]} image (MAX_PIXELS="
                         f"{MAX_PIXELS}); the file is damaged or was not written by densessl: write it again with "
                         "python -m densessl.pipeline.ffcv")
    return int(pixels.max(initial=0))


def read_stored_image(beton: str | Path, index: int) -> np.ndarray:
    """Sample ``index``'s image as the .beton stores it and FFCV decodes it (HxWx3 uint8): what views are cut from.

    FFCV re-encodes JPEGs (OpenCV, 4:2:0 chroma), may shrink to ``max_resolution``, and its fast decoder reads
    red and blue about one level darker than libjpeg-turbo's accurate mode; this shows the combined result.
    """
    reader = Reader(str(beton))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    largest_image(meta["height"], meta["width"], str(beton))
    field = meta[index]
    table = reader.alloc_table
    size = int(table["size"][np.flatnonzero(table["ptr"] == field["data_ptr"])[0]])
    data = np.fromfile(str(beton), np.uint8, count=size, offset=int(field["data_ptr"]))
    h, w = int(field["height"]), int(field["width"])
    if field["mode"] != IMAGE_MODES["jpg"]:
        return data.reshape(h, w, 3)
    image = np.empty((h, w, 3), np.uint8)
    if imdecode(data, image.reshape(-1), h, w, h, w, 0, 0, 1, 1, False, False) != 0:
        raise BadImage(f"sample {index} of {beton} failed to decode: the .beton is damaged")
    return image


@njit(cache=True)
def batch_key(indices, seed):
    """An order-sensitive hash of a batch's sample indices (changes whenever FFCV reshuffles)."""
    key = np.uint64(seed)
    for i in indices:
        _, key = splitmix64(key ^ np.uint64(i))
    return key


@njit(cache=True)
def pair_seed(key, index):
    return splitmix64(key ^ (np.uint64(index) * np.uint64(0xD1B54A32D192ED03)))[1]


@njit(cache=True)
def batch_view_params(indices, heights, widths, seed, first, counts, sizes, crops, pair_views, cells, area, joint,
                      fallback, stride, max_tries):
    """``draw_views`` of every sample of a batch, with the decoder's seeds: windows [B, V, 6] and match seeds
    [B, P]."""
    key = batch_key(indices, seed)
    windows = np.empty((len(indices), sizes.shape[0], 6), np.int64)
    seeds = np.empty((len(indices), pair_views.shape[0]), np.uint64)
    for k in range(len(indices)):
        i = indices[k]
        windows[k], seeds[k] = draw_views(pair_seed(key, i), heights[i], widths[i], first, counts, sizes,
                                                 crops, pair_views, cells, area, joint, fallback, stride, max_tries)
    return windows, seeds


class ViewsDecoder(SimpleRGBImageDecoder):
    """Decodes an ``RGBImageField`` once per sample and cuts every view of a ``ViewSpec`` from it, into one flat
    ``uint8`` row per sample (FFCV's pipelines have one fixed-shape output per field; views of several sizes go
    end to end, and the loader splits them: ``contract.unpack_views``).

    A subclass of the field's own decoder class: FFCV treats the first op of a pipeline as its decoder only then
    (otherwise it silently prepends a default decoder and runs this as a transform)."""

    def __init__(self, spec: ViewSpec, seed: int = 0, source: str = "the .beton"):
        super().__init__()
        self.spec, self.seed, self.offsets, self.source = spec, seed, spec.offsets, source

    def sampler_args(self) -> tuple:
        """``batch_view_params``' arguments after (indices, heights, widths)."""
        return (np.uint64(self.seed), *self.spec.arrays)

    def declare_state_and_memory(self, previous_state):
        """Output rows, a JPEG scratch row per sample (the largest declared image: ``largest_image`` refuses a
        damaged header here, when FFCV's ``Loader`` is built, before anything is allocated) and failure flags."""
        largest = largest_image(self.metadata["height"], self.metadata["width"], self.source)
        shape, u8 = (int(self.offsets[-1]),), np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                (AllocationQuery(shape, u8), AllocationQuery((3 * largest,), u8), AllocationQuery((1,), u8)))

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        jpg = IMAGE_MODES["jpg"]
        seed, first, counts, sizes, crops, pair_views, cells, area, joint, fallback, stride, max_tries = \
            self.sampler_args()
        offsets = self.offsets

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch, failed = storage
            key = batch_key(batch_indices, seed)
            for k in my_range(len(batch_indices)):
                index = batch_indices[k]
                field = metadata[index]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = np.uint32(field["height"]), np.uint32(field["width"])
                windows, _ = draw_views(pair_seed(key, index), h, w, first, counts, sizes, crops, pair_views, cells,
                                        area, joint, fallback, stride, max_tries)
                if field["mode"] == jpg:
                    buffer = scratch[k]
                    failed[k, 0] = imdecode_c(data, buffer, h, w, h, w, 0, 0, 1, 1, False, False) != 0
                    image = buffer.reshape(-1)[: 3 * h * w].reshape(h, w, 3)
                else:
                    failed[k, 0] = 0
                    image = data.reshape(h, w, 3)
                cut_views(image, windows, sizes, offsets, destination[k])
            for k in range(len(batch_indices)):
                if failed[k, 0]:
                    raise ValueError("a JPEG stored in the .beton failed to decode: the file is damaged; "
                                     "write it again (python -m densessl.pipeline.ffcv)")
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class FfcvLoader(Position):
    """The FFCV backend (``backend="ffcv"``) behind ``contract.ViewLoader``, over an FFCV ``Loader`` (page
    reads, ordering, OS cache, distributed): every view of a ``ViewSpec``. Build it with
    ``pipeline.build_loader``."""

    def __init__(self, beton: str | Path, spec: ViewSpec, batch_size: int, workers: int = 4,
                 seed: int = 0, order: str = "random", distributed: bool = False, drop_last: bool = True,
                 os_cache: bool = True, batches_ahead: int = 3, state: dict | None = None):
        if not Path(beton).is_file():  # order and backend rules: factory.check_backend, via build_loader
            raise FileNotFoundError(f"{beton} does not exist: write it with python -m densessl.pipeline.ffcv")
        super().__init__(state)
        use_private_state_types()
        self.decoder = ViewsDecoder(spec, seed, source=str(beton))
        self.spec = spec
        self.loader = Loader(str(beton), batch_size=batch_size, num_workers=workers, order=ORDERS[order],
                             seed=seed, os_cache=os_cache, distributed=distributed, drop_last=drop_last,
                             batches_ahead=batches_ahead,
                             pipelines={"image": [self.decoder], "label": [IntDecoder()], "index": [IntDecoder()]})
        reader = self.loader.reader
        meta = reader.metadata[f"f{reader.field_names.index('image')}"]  # FFCV names metadata columns f0, f1..
        self.heights, self.widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        """FFCV orders epoch ``epoch`` from its seed; the first ``batch`` batches (a resumed run) are skipped."""
        self.loader.next_epoch, skip = self.epoch, self.batch
        batches = (self._to_batch(views, index.reshape(-1).astype(np.int64))
                   for i, (views, _, index) in enumerate(_until_failure(iter(self.loader))) if i >= skip)
        return self._counted(batches)

    def _to_batch(self, rows: np.ndarray, index: np.ndarray) -> dict[str, torch.Tensor]:
        windows, seeds = batch_view_params(index, self.heights, self.widths, *self.decoder.sampler_args())
        source_hw = np.stack([self.heights[index], self.widths[index]], 1)
        # one copy: FFCV reuses its output buffers
        packed = pack_views(np.array(rows[:len(index)]), windows, seeds, source_hw, index, self.spec)
        return unpack_views(packed, self.spec)


def _until_failure(epoch):
    """FFCV 1.0.2 runs an epoch in a thread that dies silently on an exception (a damaged .beton, a bad
    decoder) while ``next`` waits forever for its batches; wait in short slices and raise once it is gone."""
    while True:
        while epoch.output_queue.empty():
            if not epoch.is_alive() and epoch.output_queue.empty():
                epoch.close()
                raise RuntimeError("FFCV's loader thread stopped with an error (its traceback is printed above); "
                                   "the epoch is incomplete")
            epoch.join(0.001)
        try:
            yield next(epoch)
        except StopIteration:
            return


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write an ImageFolder to an FFCV .beton (fields image, label, index)")
    p.add_argument("data", help="ImageFolder root (ROOT/<class>/<image>)")
    p.add_argument("out", help="output .beton file")
    p.add_argument("--max-resolution", type=int, default=None, help="shrink longer sides above this")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart", "proportion"])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        out = write_beton(args.data, args.out, args.max_resolution, args.jpeg_quality, args.write_mode, args.workers)
    except NotOurs as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
