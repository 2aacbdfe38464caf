"""Attacker A1: off-the-shelf face detection and face recognition on surface renders of a head.

DESIGN.md §6: render the skin isosurface from several yaw/pitch angles (``semid.render``), look for
a face with dlib (HOG, optionally CNN, through ``face_recognition``) and with MediaPipe's BlazeFace,
and embed each face with dlib's 128-d ResNet. The gallery is renders of the original volumes; probes
are renders of de-identified ones. ``FaceAttack.evaluate`` reports the face-detection rate, rank-1
identification and the match rate at dlib's usual 0.6 distance threshold.

None of the attacker's packages is a SemID dependency: they are the ``attack`` group of pyproject.toml,
installed with ``pip install --no-deps`` as its comment says (not through pip's resolver), and are
imported lazily, so ``import semid.eval`` works without them and ``require()`` explains what is
missing. All models come inside the wheels
(``face_recognition_models`` for dlib, ``mediapipe/modules/face_detection`` for BlazeFace); nothing
is downloaded at run time.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from semid import render

#: dlib's documented same-person threshold on the 128-d embedding distance (face_recognition's default).
MATCH_THRESHOLD = 0.6
#: Views of DESIGN.md §6: yaw -40..40 degrees, pitch -20..20 degrees.
YAWS: tuple[float, ...] = (-40.0, -20.0, 0.0, 20.0, 40.0)
PITCHES: tuple[float, ...] = (-20.0, 0.0, 20.0)
#: Detector names, in the order their boxes are preferred for embedding (dlib's landmark model was fit
#: to dlib's own detector boxes, so a HOG box gives the most faithful embedding).
DETECTORS: tuple[str, ...] = ("hog", "cnn", "mediapipe")

#: A face box in face_recognition's convention: (top, right, bottom, left), pixels.
Box = tuple[int, int, int, int]
View = tuple[float, float]


class AttackUnavailable(ImportError):
    """The optional attacker packages are not installed."""


def _patch_protobuf() -> None:
    """Let MediaPipe 0.10.14 run on protobuf >= 5 (we keep protobuf 7: tensorboard and
    opentelemetry-proto in the server stack need >= 5/6, mediapipe's metadata asks for < 5).

    MediaPipe's Python glue calls ``SymbolDatabase.GetPrototype`` / ``MessageFactory.GetPrototype``,
    which protobuf removed (5.x/6.x) in favour of ``message_factory.GetMessageClass``; without this,
    reading the detections of any image that contains a face raises AttributeError.
    """
    from google.protobuf import message_factory, symbol_database

    def get_prototype(_self: object, descriptor: Any) -> Any:
        return message_factory.GetMessageClass(descriptor)

    for cls in (symbol_database.SymbolDatabase, message_factory.MessageFactory):
        if not hasattr(cls, "GetPrototype"):
            cls.GetPrototype = get_prototype  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=1)
def require() -> tuple[Any, Any]:
    """Import and return ``(face_recognition, mediapipe)``, or raise ``AttackUnavailable``."""
    try:
        import warnings

        _patch_protobuf()
        with warnings.catch_warnings():
            # face_recognition_models imports pkg_resources (hence setuptools<81): its deprecation
            # warning is noise here, not something a benchmark user can act on.
            warnings.simplefilter("ignore", UserWarning)
            import face_recognition
        import mediapipe
    except ImportError as exc:
        raise AttackUnavailable(
            f"attacker A1 needs the optional `attack` packages (installed with --no-deps as pyproject.toml "
            f"says) ({exc})") from exc
    return face_recognition, mediapipe


@functools.lru_cache(maxsize=2)
def _mediapipe_detector(model_selection: int) -> Any:
    """BlazeFace (0: short range, for faces filling the frame; 1: full range), loaded once."""
    _, mp = require()
    return mp.solutions.face_detection.FaceDetection(model_selection=model_selection,
                                                    min_detection_confidence=0.5)


def to_rgb(shaded: np.ndarray) -> np.ndarray:
    """A float [0, 1] render as a contiguous uint8 RGB image (what both detectors take)."""
    gray = (np.clip(shaded, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def render_views(image: sitk.Image, yaws: Iterable[float] = YAWS, pitches: Iterable[float] = PITCHES,
                 size: int = 512, threshold: float | None = None) -> dict[View, np.ndarray]:
    """uint8 RGB skin renders of ``image`` for every (yaw, pitch), keyed by ``(yaw, pitch)``.

    ``threshold`` is the head threshold (default: found from the image); pass the original's when
    rendering its de-identified output so both surfaces are cut at the same intensity.
    """
    surface, _ = render.surface_mask(image, threshold)  # one surface, many cameras
    return {(float(y), float(p)): to_rgb(render.render_surface(surface, y, p, size=size))
            for p in pitches for y in yaws}


def _mediapipe_boxes(rgb: np.ndarray) -> list[Box]:
    """Boxes from both BlazeFace models (short range finds the frame-filling renders, full range the
    smaller faces of tilted views), in pixels."""
    h, w = rgb.shape[:2]
    boxes: list[Box] = []
    for model in (0, 1):
        for det in _mediapipe_detector(model).process(rgb).detections or []:
            rel = det.location_data.relative_bounding_box
            left, top = max(0, int(rel.xmin * w)), max(0, int(rel.ymin * h))
            right, bottom = min(w, int((rel.xmin + rel.width) * w)), min(h, int((rel.ymin + rel.height) * h))
            if right > left and bottom > top:
                boxes.append((top, right, bottom, left))
    return boxes


def detect_faces(rgb: np.ndarray, cnn: bool = False, upsample: int = 1) -> dict[str, list[Box]]:
    """Faces found in ``rgb`` by each detector: {"hog": [...], "cnn": [...], "mediapipe": [...]}.

    Args:
        rgb: uint8 RGB image.
        cnn: also run dlib's CNN (MMOD) detector: better on odd poses, but about a second or more
            per 512 px image on a CPU, so off by default (its key is then absent).
        upsample: dlib's image upsampling count (1 = face_recognition's default).
    """
    fr, _ = require()
    found = {"hog": [tuple(b) for b in fr.face_locations(rgb, upsample, model="hog")]}
    if cnn:
        found["cnn"] = [tuple(b) for b in fr.face_locations(rgb, upsample, model="cnn")]
    found["mediapipe"] = _mediapipe_boxes(rgb)
    return found


def best_box(found: dict[str, list[Box]]) -> Box | None:
    """The box to embed: the largest face of the most preferred detector that found one."""
    for name in DETECTORS:
        boxes = found.get(name) or []
        if boxes:
            return max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
    return None


def head_box(rgb: np.ndarray) -> Box | None:
    """Bounding box of the rendered head (non-black pixels): where to embed when no detector fires."""
    rows, cols = np.nonzero(rgb[..., 0])
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1, int(cols.min())


def embed(rgb: np.ndarray, box: Box) -> np.ndarray:
    """dlib's 128-d face embedding of ``rgb`` inside ``box`` (top, right, bottom, left)."""
    fr, _ = require()
    return np.asarray(fr.face_encodings(rgb, known_face_locations=[tuple(int(v) for v in box)])[0])


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two embeddings (dlib: < 0.6 means the same person)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


@dataclass
class ViewResult:
    """What the attacker got from one render."""

    view: View
    found: dict[str, list[Box]]
    embedding: np.ndarray | None

    @property
    def detected(self) -> bool:
        """Whether any detector found a face."""
        return any(self.found.values())


@dataclass
class FaceAttack:
    """Attacker A1 over a gallery of original volumes and probes of de-identified ones.

    Args:
        yaws, pitches: render angles (degrees); every combination is one view.
        size: render size in pixels.
        cnn: also run dlib's CNN detector (slow on CPU).
        embed_undetected: also embed views where no detector fired, inside the head's bounding box.
            Off by default: the attacker of DESIGN.md §6 is an off-the-shelf pipeline, which only
            recognises what it detects. On, it is a stronger attacker that knows a face is there.
    """

    yaws: Sequence[float] = YAWS
    pitches: Sequence[float] = PITCHES
    size: int = 512
    cnn: bool = False
    embed_undetected: bool = False
    #: Gallery id -> its views. Cached per id (the same id is assumed to mean the same images), so
    #: evaluating several methods' probes against one gallery renders the originals once.
    _gallery_cache: dict[Hashable, list[ViewResult]] = field(default_factory=dict, repr=False)

    @property
    def detector_names(self) -> tuple[str, ...]:
        """Detectors this attacker runs."""
        return tuple(d for d in DETECTORS if self.cnn or d != "cnn")

    def analyse(self, image: sitk.Image, threshold: float | None = None) -> list[ViewResult]:
        """Render every view of ``image``, detect faces, embed the detected ones."""
        results = []
        for view, rgb in render_views(image, self.yaws, self.pitches, self.size, threshold).items():
            found = detect_faces(rgb, cnn=self.cnn)
            box = best_box(found) or (head_box(rgb) if self.embed_undetected else None)
            results.append(ViewResult(view, found, embed(rgb, box) if box is not None else None))
        return results

    def gallery_views(self, identity: Hashable, images: Sequence[sitk.Image]) -> list[ViewResult]:
        """All views of an identity's gallery images (cached per identity)."""
        if identity not in self._gallery_cache:
            self._gallery_cache[identity] = [v for img in images for v in self.analyse(img)]
        return self._gallery_cache[identity]

    def evaluate(self, gallery: dict[Hashable, list[sitk.Image]],
                 probes: Sequence[tuple[Hashable, sitk.Image]]) -> dict[str, Any]:
        """Detection rate, rank-1 identification and match rate at 0.6 of ``probes`` against ``gallery``.

        The distance from a probe to an identity is the smallest distance between any embedded view
        of the probe and any embedded view of that identity's gallery images (the attacker picks its
        best-matching pose). A probe with no embedded view is not identified and does not match.

        Returns:
            ``detection_rate`` (per detector and ``any``: fraction of probes with a face found in at
            least one view), ``view_detection_rate`` (the same over single renders), ``rank1``,
            ``match_rate`` (fraction of probes whose true identity is closer than ``MATCH_THRESHOLD``),
            counts, and ``probes``: per probe its true and predicted id and true/best distances.
        """
        ids = list(gallery)
        gal = {i: np.array([v.embedding for v in self.gallery_views(i, gallery[i]) if v.embedding is not None])
               for i in ids}
        names = (*self.detector_names, "any")
        probe_hits = dict.fromkeys(names, 0)
        view_hits = dict.fromkeys(names, 0)
        n_views = n_embedded = correct = matched = 0
        per_probe = []
        for true_id, image in probes:
            views = self.analyse(image)
            n_views += len(views)
            for name in names:
                hits = [v.detected if name == "any" else bool(v.found.get(name)) for v in views]
                view_hits[name] += sum(hits)
                probe_hits[name] += any(hits)
            emb = np.array([v.embedding for v in views if v.embedding is not None])
            dists = {i: (float(np.linalg.norm(emb[:, None] - g[None], axis=-1).min())
                         if len(emb) and len(g) else float("inf")) for i, g in gal.items()}
            predicted = min(dists, key=dists.__getitem__) if len(emb) and ids else None
            true_d = dists.get(true_id, float("inf"))
            n_embedded += bool(len(emb))
            correct += predicted is not None and predicted == true_id and np.isfinite(dists[predicted])
            matched += true_d < MATCH_THRESHOLD
            per_probe.append({"true_id": true_id, "predicted_id": predicted, "true_distance": true_d,
                              "best_distance": min(dists.values(), default=float("inf")),
                              "views_detected": sum(v.detected for v in views)})
        n = max(len(probes), 1)
        return {
            "detection_rate": {k: probe_hits[k] / n for k in names},
            "view_detection_rate": {k: view_hits[k] / max(n_views, 1) for k in names},
            "rank1": correct / n,
            "match_rate": matched / n,
            "match_threshold": MATCH_THRESHOLD,
            "n_gallery_ids": len(ids),
            "n_gallery_views": sum(len(self._gallery_cache[i]) for i in ids),
            "n_gallery_views_embedded": int(sum(len(g) for g in gal.values())),
            "n_probes": len(probes),
            "n_probe_views": n_views,
            "n_probes_embedded": n_embedded,
            "probes": per_probe,
        }
