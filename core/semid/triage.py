"""Triage: what a volume is, read from its own voxels before anything is changed (DESIGN.md §4 step 0).

Every volume is one of:

- ``face``: a head with identity-bearing anatomy in view (the whole face or any part of it: eyes and
  brows, nose, mouth and chin, ears). It is de-identified as far as the field of view goes.
- ``defaced``: a head whose face was cut away or zeroed (the face parts in view are air). What remains
  (ears, eyes, the rim of the cut) is de-identified, and the record says ``already_defaced``.
- ``skull-stripped``: a brain with no scalp, skull or skin around it. Nothing identifies it by its
  surface; it is never changed.
- ``no-identity-in-view``: a head whose field of view holds no face part and no ear (the top of the
  head only). Nothing is changed; the record says why.
- ``not-a-head``: refused with one sentence.

Each decision rests on numbers measured on this image, kept in ``Triage.evidence`` and in the record:
the head's volume and field of view, the brain found in the image (``semid.brain``), the share of the
head that is not brain, how well the average head fits it (mutual information inside the field of
view, ``identity.fit_atlas``), whether the fitted atlas brain agrees with the brain found in the image,
and how much of the atlas's face and ear parts that fall in view are tissue in this head. Where these
disagree the volume is refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from semid import identity as idm
from semid.brain import Brain, find_brain
from semid.grids import FieldOfView
from semid.intensities import Values, read_values

FACE, DEFACED, SKULL_STRIPPED, NOTHING_IN_VIEW, NOT_A_HEAD = (
    "face", "defaced", "skull-stripped", "no-identity-in-view", "not-a-head")
#: Classes whose volume is written unchanged (``--no-passthrough`` writes nothing for them).
PASS_THROUGH = (SKULL_STRIPPED, NOTHING_IN_VIEW)

#: Spacing (mm) of the coarse copy the head mask and the levels are read on.
COARSE_MM = 2.0
#: Smallest foreground (ml) that can be a head or a brain.
MIN_HEAD_ML = 250.0
#: The brain is grown by this much (mm) before the head outside it is measured (a stripping mask often
#: keeps a rim of CSF and meninges).
BRAIN_GROW_MM = 4.0
#: Share of the foreground outside the (grown) brain below which there is no scalp, skull or skin.
STRIPPED_NON_BRAIN_SHARE = 0.15
#: Share of the foreground's surface in view that lies on the brain's (within ``SURFACE_ON_BRAIN_MM``) from
#: which a foreground with little outside the brain is a brain alone: the top of a head also has little
#: outside its brain, but its surface is the scalp's, a centimetre out (skull-stripped brains 0.97, the top
#: 80 mm of the real T1w head 0.53: ``semid.eval.real_heads``).
STRIPPED_SURFACE_SHARE, SURFACE_ON_BRAIN_MM = 0.8, 4.0
#: Dice of the fitted average head with this head, inside the field of view, below which it is no head.
MIN_HEAD_DICE = 0.8
#: Dice of the brain found in the image with the fitted atlas brain below which neither is trusted.
MIN_BRAIN_AGREEMENT = 0.7
#: Normalised mutual information (Studholme, 1 = unrelated, 2 = identical) between the fitted average
#: head and this volume's voxels, below which the volume does not look like a head inside (a head CT fits the
#: T1w average head at about 1.015, MR heads at 1.02-1.06; a cylinder 1.002, noise 1.000).
MIN_HEAD_NMI = 1.005
#: The same for the average head's brain and a foreground that has no scalp or skull, measured inside it
#: (``BRAIN_NMI_INSET_MM``): skull-stripped brains 1.023-1.059 (ICBM T1/T2, MNI152, the real head stripped by
#: HD-BET), a sphere, an ellipsoid or a uniform ball of brain size 1.000-1.001.
MIN_BRAIN_NMI = 1.01
#: Depth (mm) inside the foreground from which that mutual information is measured.
BRAIN_NMI_INSET_MM = 4.0
#: Dice of the atlas brain fitted to such a foreground below which it is not shaped like a brain
#: (skull-stripped brains 0.96; a sphere 0.88, an ellipsoid 0.91).
MIN_BRAIN_SHAPE_DICE = 0.85
#: Face parts (ml of the atlas's nose, lips, brows, chin) and ear parts in view below which none is in view.
MIN_PARTS_IN_VIEW_ML = 1.5
#: Share of the face parts in view that are tissue below which the face is taken to be cut away.
DEFACED_BELOW = 0.35
#: Atlas features farther than this (mm) from the head's mid-plane, and behind the face, are ear parts.
EAR_LATERAL_MM = 55.0
#: A face or ear part counts as in view when it lies this far (mm) inside the field of view's edge (a part cut
#: by the edge is neither there nor missing), and as present when tissue lies within this distance (mm) of
#: it (the fit of an average face to a person's is a few millimetres off; a cut-away face is centimetres).
PART_INSET_MM, PART_TOLERANCE_MM = 6.0, 4.0
#: The face parts below this quantile of their height are the lower face (nose, lips, chin). With at least
#: ``MIN_LOWER_FACE_ML`` of it in view and less than ``LOWER_FACE_DEFACED_BELOW`` of that tissue, the head is
#: defaced (``semid.eval.real_heads``: quickshear 0.37, pydeface's mask 0.24, voxface's 0.00; whole, cropped,
#: CT and average faces 0.79-0.97).
LOWER_FACE_QUANTILE, MIN_LOWER_FACE_ML, LOWER_FACE_DEFACED_BELOW = 0.6, 5.0, 0.55


@dataclass
class Triage:
    """What a volume is (``assess``), with what was measured to decide it.

    Attributes:
        kind: one of ``FACE``, ``DEFACED``, ``SKULL_STRIPPED``, ``NOTHING_IN_VIEW``, ``NOT_A_HEAD``.
        sentence: the finding in one sentence (the reason of a refusal or a pass-through).
        evidence: the numbers measured on this image (JSON-ready).
        values: the image's levels (``semid.intensities``).
        head: the head (foreground) mask on the coarse grid (uint8).
        fov: the field of view.
        brain: the brain found in the image (None before it was looked for).
        fit: the atlas fit (None unless a head).
        timings: seconds per step.
    """

    kind: str
    sentence: str
    evidence: dict
    values: Values
    head: sitk.Image
    fov: FieldOfView
    brain: Brain | None = None
    fit: idm.Fit | None = None
    timings: dict = field(default_factory=dict)

    @property
    def passes_through(self) -> bool:
        """True for volumes that are written unchanged (skull-stripped, nothing identifying in view)."""
        return self.kind in PASS_THROUGH

    def record(self) -> dict:
        """The triage's part of the record: class, finding, evidence."""
        return {"class": self.kind, "finding": self.sentence, "evidence": self.evidence}


def _lap(timings: dict, name: str, since: list[float]) -> None:
    import time

    now = time.perf_counter()
    timings[name] = round(now - since[0], 3)
    since[0] = now


def coarse_copy(image: sitk.Image) -> sitk.Image:
    """The volume (float32) on a ``COARSE_MM`` grid of its own orientation, block-averaged first."""
    return idm.coarse_copy(image, COARSE_MM)


def assess(image: sitk.Image, atlas: idm.Atlas, declared_modality: str = "") -> Triage:
    """Triage one 3D volume (any orientation, spacing, MR weighting or CT). Never raises for what the
    volume is: a refusal is ``kind == NOT_A_HEAD`` with its sentence."""
    import time

    timings: dict = {}
    since = [time.perf_counter()]
    coarse = coarse_copy(image)
    values = read_values(coarse, declared_modality)
    fov = FieldOfView.of(image)
    head = idm.head_mask(coarse, values.threshold)
    voxel_ml = float(np.prod(coarse.GetSpacing())) / 1000.0
    head_arr = sitk.GetArrayViewFromImage(head) > 0
    head_ml = float(head_arr.sum()) * voxel_ml
    evidence: dict = {"levels": values.describe(), "field_of_view": fov.describe(image),
                      "foreground_ml": round(head_ml, 1)}
    _lap(timings, "head_mask", since)

    def verdict(kind: str, sentence: str, **extra) -> Triage:
        return Triage(kind, sentence, evidence, values, head, fov, timings=timings, **extra)

    if head_ml < MIN_HEAD_ML:
        return verdict(NOT_A_HEAD, f"No head found: the foreground is {head_ml:.0f} ml, less than any head "
                                   f"or brain ({MIN_HEAD_ML:.0f} ml); give a head CT or MR volume.")
    brain = find_brain(image, values)
    brain_on_coarse, grown = brain.within(coarse, (0.0, BRAIN_GROW_MM))
    brain_ml = float((brain_on_coarse & head_arr).sum()) * voxel_ml
    non_brain = float((head_arr & ~grown).sum()) * voxel_ml / head_ml
    evidence["brain"] = {"method": brain.method, "volume_ml": round(brain_ml, 1), **brain.evidence}
    evidence["non_brain_share"] = round(non_brain, 4)
    _lap(timings, "brain", since)

    in_view = fov.mask_on(image, coarse)  # once: used by four checks
    surface = _surface_on_brain(head, brain, in_view)
    evidence["surface_on_brain_share"] = round(surface, 4)
    if non_brain < STRIPPED_NON_BRAIN_SHARE and surface >= STRIPPED_SURFACE_SHARE:
        # no scalp, skull or skin outside the brain: a brain only?
        return _brain_only(image, coarse, head, brain, atlas, evidence, verdict, timings, since)
    # with scalp and skull around little brain (the top of a head, a face or sinus scan, or a CT whose brain
    # could not be enclosed) the fit decides, and its brain must agree with the image's (below)

    fit = idm.fit_atlas(atlas, head, brain.mask, image, in_view)
    nmi = _fitted_nmi(atlas.template, coarse, fit.transform, head)
    agreement = _brain_agreement(atlas.brain_image, brain, coarse, in_view, fit.transform)
    cut = idm.cut_sides(head, in_view) if not _fit_holds(fit, nmi, agreement) else []  # (only when needed)
    if cut:
        # a head cut by the field of view (the top of a head alone) has its brain's centre far from the whole
        # brain's: a second fit starts from the head's uncut edges, taken if it holds where the first did not
        again = idm.fit_atlas(atlas, head, brain.mask, image, in_view,
                              idm.start_from_uncut_edges(atlas.head, head, cut))
        again_nmi = _fitted_nmi(atlas.template, coarse, again.transform, head)
        again_agreement = _brain_agreement(atlas.brain_image, brain, coarse, in_view, again.transform)
        evidence["second_fit"] = {"start": "the head's edges the field of view does not cut",
                                  "head_fit_dice": round(again.dice, 4), "template_nmi": round(again_nmi, 4),
                                  "brain_agreement_dice": round(again_agreement, 4),
                                  "used": _fit_holds(again, again_nmi, again_agreement)
                                  or (_head_fits(again, again_nmi) and not _head_fits(fit, nmi))}
        if evidence["second_fit"]["used"]:
            fit, nmi, agreement = again, again_nmi, again_agreement
    _lap(timings, "registration", since)
    evidence.update(head_fit_dice=round(fit.dice, 4), template_nmi=round(nmi, 4),
                    brain_agreement_dice=round(agreement, 4))
    if not _head_fits(fit, nmi):
        return verdict(NOT_A_HEAD, f"No head found: the average head fits this volume at Dice {fit.dice:.2f} "
                                   f"(needs {MIN_HEAD_DICE:.2f}) with mutual information {nmi:.3f} (needs "
                                   f"{MIN_HEAD_NMI:.3f}); give a head CT or MR volume, and check the orientation "
                                   "in its header.", brain=brain, fit=fit)
    if agreement < MIN_BRAIN_AGREEMENT:
        return verdict(NOT_A_HEAD, f"The brain could not be found with confidence (the brain found in the "
                                   f"image and the fitted atlas brain agree at Dice {agreement:.2f}, needs "
                                   f"{MIN_BRAIN_AGREEMENT:.2f}); SemID does not guess where the brain is: check "
                                   "the volume (orientation, contrast) or de-identify it another way.",
                       brain=brain, fit=fit)
    parts = _parts_in_view(atlas, fit, head, in_view)
    evidence["identity_parts"] = parts
    fit.coverage = parts["face_present_share"] if parts["face_in_view_ml"] else parts["ears_present_share"]
    _lap(timings, "triage", since)
    if parts["face_in_view_ml"] < MIN_PARTS_IN_VIEW_ML and parts["ears_in_view_ml"] < MIN_PARTS_IN_VIEW_ML:
        return verdict(NOTHING_IN_VIEW, "No face part and no ear is in the field of view: nothing identifying "
                                        "to remove, the volume is left as it is.", brain=brain, fit=fit)
    face_cut = parts["face_in_view_ml"] >= MIN_PARTS_IN_VIEW_ML and parts["face_present_share"] < DEFACED_BELOW
    # a defacing tool cuts the nose, lips and chin and may leave the brows (quickshear's plane, a face mask)
    lower_cut = (parts["lower_face_in_view_ml"] >= MIN_LOWER_FACE_ML
                 and parts["lower_face_present_share"] < LOWER_FACE_DEFACED_BELOW)
    if face_cut or lower_cut:
        return verdict(DEFACED, f"The head is already defaced: {100 * parts['face_present_share']:.0f} % of the "
                                f"face parts in view are tissue ({100 * parts['lower_face_present_share']:.0f} % of "
                                "nose, lips and chin); what identifying anatomy remains (ears, eyes, the rim of the "
                                "cut) is de-identified.", brain=brain, fit=fit)
    return verdict(FACE, "A head with identity-bearing anatomy in view: de-identified as far as the field "
                         "of view goes.", brain=brain, fit=fit)


def _head_fits(fit: idm.Fit, nmi: float) -> bool:
    """Whether the fitted average head matches the volume (it is a head)."""
    return fit.dice >= MIN_HEAD_DICE and nmi >= MIN_HEAD_NMI


def _fit_holds(fit: idm.Fit, nmi: float, agreement: float) -> bool:
    """Whether a fit passes the checks that make the volume a head with a brain found with confidence."""
    return _head_fits(fit, nmi) and agreement >= MIN_BRAIN_AGREEMENT


def _surface_on_brain(head: sitk.Image, brain: Brain, in_view: sitk.Image) -> float:
    """Share of ``head``'s surface voxels (inside the field of view, ``PART_INSET_MM`` from its edge) that lie
    within ``SURFACE_ON_BRAIN_MM`` of the brain's surface."""
    inner = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(in_view, insideIsPositive=True, squaredDistance=False,
                                                               useImageSpacing=True)) >= PART_INSET_MM
    solid = sitk.GetArrayFromImage(head) > 0
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(head, [1, 1, 1])) > 0
    surface = solid & ~eroded & inner
    if not surface.any():
        return 0.0
    dist = sitk.GetArrayFromImage(sitk.Resample(brain.distance_mm(), head, sitk.Transform(), sitk.sitkLinear, 1e4,
                                                sitk.sitkFloat32))
    return float((np.abs(dist[surface]) <= SURFACE_ON_BRAIN_MM).mean())


def _brain_only(image: sitk.Image, coarse: sitk.Image, head: sitk.Image, brain: Brain, atlas: idm.Atlas,
                evidence: dict, verdict, timings: dict, since: list[float]) -> Triage:
    """A foreground with no scalp, skull or skin: skull-stripped if it is shaped and patterned like a brain,
    else not a head."""
    shape_dice, nmi = _brain_likeness(atlas, coarse, head)
    evidence.update(brain_shape_dice=round(shape_dice, 4), brain_template_nmi=round(nmi, 4))
    _lap(timings, "triage", since)
    if shape_dice >= MIN_BRAIN_SHAPE_DICE and nmi >= MIN_BRAIN_NMI:
        return verdict(SKULL_STRIPPED, "Skull-stripped: a brain with no scalp, skull or skin around it "
                                       f"({100 * evidence['non_brain_share']:.0f} % of the foreground is not "
                                       "brain); nothing identifying to remove, the volume is left as it is.",
                       brain=brain)
    return verdict(NOT_A_HEAD, f"No head found: the volume has no scalp or skull around a brain and is not "
                               f"shaped and patterned like a brain (Dice {shape_dice:.2f}, mutual information "
                               f"{nmi:.3f}); give a head CT or MR volume.", brain=brain)


def _brain_likeness(atlas: idm.Atlas, coarse: sitk.Image, head: sitk.Image) -> tuple[float, float]:
    """How brain-like a foreground is: the Dice of the atlas's brain fitted to it (similarity, mask
    registration) and the mutual information of the average head's brain with its voxels, so fitted."""
    fixed = idm.smooth_mask(head)
    moving = idm.smooth_mask(atlas.brain_image)
    centre, ml = idm.centroid_mm(head)
    atlas_centre, atlas_ml = idm.centroid_mm(atlas.brain_image)
    start = sitk.Similarity3DTransform()
    start.SetCenter(centre.tolist())
    start.SetTranslation((atlas_centre - centre).tolist())
    start.SetScale(float(np.clip((atlas_ml / max(ml, 1.0)) ** (1.0 / 3.0), *idm.START_SCALE)))
    with idm.one_thread():  # the same volume, the same answer
        subject_to_atlas = idm.register_masks(fixed, moving, start, 100)
    warped = sitk.Resample(atlas.brain_image, head, subject_to_atlas, sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayViewFromImage(warped) > 0
    b = sitk.GetArrayViewFromImage(head) > 0
    dice = float(2.0 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1))
    template_brain = sitk.Mask(atlas.template, atlas.brain_image)
    # inside the foreground only (``BRAIN_NMI_INSET_MM`` from its edge): the edge's partial volume follows the
    # fitted brain's edge even in a uniform ball, so only the pattern inside (grey, white matter, CSF) counts
    inner = sitk.Cast(sitk.SignedMaurerDistanceMap(head, insideIsPositive=True, squaredDistance=False,
                                                   useImageSpacing=True) >= BRAIN_NMI_INSET_MM, sitk.sitkUInt8)
    nmi = _fitted_nmi(template_brain, coarse, subject_to_atlas.GetInverse(), inner)
    return dice, nmi


def _fitted_nmi(template: sitk.Image, coarse: sitk.Image, template_to_subject: sitk.Transform,
                where: sitk.Image) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B) of ``template`` (fitted) and ``coarse``'s
    voxels inside ``where`` (32 bins each, each image's 1st-99th percentiles)."""
    warped = sitk.GetArrayFromImage(sitk.Resample(template, coarse, template_to_subject.GetInverse(),
                                                      sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = sitk.GetArrayViewFromImage(where) > 0
    a = warped[inside]
    b = sitk.GetArrayViewFromImage(coarse)[inside]
    if a.size < 100:
        return 1.0

    def binned(v: np.ndarray) -> np.ndarray:
        v = np.nan_to_num(v.astype(np.float64))
        lo, hi = np.percentile(v, (1, 99))
        return np.clip(np.floor((v - lo) / max(float(hi - lo), 1e-6) * 32), 0, 31).astype(int)

    joint = np.bincount(binned(a) * 32 + binned(b), minlength=1024).astype(np.float64).reshape(32, 32)
    p = joint / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    return (entropy(p.sum(axis=0)) + entropy(p.sum(axis=1))) / max(entropy(p), 1e-9)


def _brain_agreement(atlas_brain: sitk.Image, brain: Brain, coarse: sitk.Image, in_view: sitk.Image,
                     template_to_subject: sitk.Transform) -> float:
    """Dice, inside the field of view, of the brain found in the image and the atlas's (image-found) brain
    placed by the fit."""
    warped = sitk.GetArrayFromImage(sitk.Resample(atlas_brain, coarse, template_to_subject.GetInverse(),
                                                      sitk.sitkNearestNeighbor, 0)) > 0
    view = sitk.GetArrayViewFromImage(in_view) > 0
    found = brain.on(coarse) & view
    warped = warped & view
    return float(2.0 * (found & warped).sum() / max(int(found.sum()) + int(warped.sum()), 1))


def _parts_in_view(atlas: idm.Atlas, fit: idm.Fit, head: sitk.Image, in_view: sitk.Image) -> dict:
    """The atlas's face parts (nose, lips, brows, chin; the lower face: nose, lips, chin) and ear parts placed
    on this head by the whole-head fit where there is one (it follows the face), else by the cranium fit: how
    many ml fall inside the field of view, and what share of those is tissue here."""
    transform = fit.whole_head if fit.whole_head is not None else fit.transform
    features = atlas.features
    idx = np.argwhere(sitk.GetArrayViewFromImage(features) > 0)[:, ::-1]
    template_pts = np.array([features.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx])
    centre, _ = idm.centroid_mm(atlas.head)
    ears = (np.abs(template_pts[:, 0] - centre[0]) > EAR_LATERAL_MM) & (template_pts[:, 1] > centre[1] - 50.0)
    subject_pts = np.array([transform.TransformPoint(p.tolist()) for p in template_pts])
    view = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(in_view, insideIsPositive=True, squaredDistance=False,
                                                              useImageSpacing=True)) >= PART_INSET_MM
    tissue = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(head, insideIsPositive=False, squaredDistance=False,
                                                                useImageSpacing=True)) <= PART_TOLERANCE_MM
    cont = np.array([head.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in subject_pts])
    ijk = np.rint(cont).astype(int)[:, ::-1]  # numpy (z, y, x)
    on_grid = np.all((ijk >= 0) & (ijk < np.array(view.shape)), axis=1)
    seen = np.zeros(len(ijk), bool)
    present = np.zeros(len(ijk), bool)
    seen[on_grid] = view[tuple(ijk[on_grid].T)]
    present[on_grid] = tissue[tuple(ijk[on_grid].T)]
    voxel_ml = float(np.prod(features.GetSpacing())) / 1000.0 * abs(np.linalg.det(
        np.array(transform.GetMatrix()).reshape(3, 3)))
    # the lower face (nose, lips, chin: below the brows), which every defacing tool cuts away
    z = template_pts[:, 2]
    lower = ~ears & (z < np.quantile(z[~ears], LOWER_FACE_QUANTILE)) if (~ears).any() else ~ears
    out = {}
    for name, part in (("face", ~ears), ("ears", ears), ("lower_face", lower)):
        in_view_n = int((seen & part).sum())
        out[f"{name}_in_view_ml"] = round(in_view_n * voxel_ml, 2)
        out[f"{name}_present_share"] = round(float((seen & part & present).sum()) / in_view_n, 4) if in_view_n else 0.0
    return out
