"""A synthetic mouse-brain atlas with real Allen regions, built from code alone.

The phantom is the atlas of the demo, of the simulators and of most tests: it
needs no file, is deterministic given a seed and builds in about a second.
It lives in the CCFv3 box (13.2 mm AP x 8.0 mm DV x 11.4 mm LR, orientation
``"asr"``) and its regions carry real Allen ids, acronyms, names and parents.

How it is made (see ``docs/atlas.md``):

1. Every region is an ellipsoid whose centre, spread and tilt are the first
   and second moments of the real region in the Allen CCFv3 2017 annotation
   (right hemisphere, µm; measured once and embedded below).
2. The brain body is the union of four such ellipsoids (cerebrum with
   interbrain, olfactory bulb, cerebellum, brainstem).
3. Body voxels go to the region with the smallest moment-normalised distance
   (a Mahalanobis Voronoi partition); per-region weights were calibrated so
   the large regions get roughly their real volume.
4. A white-matter layer (``cc`` and ``scwm``) separates the cortex from the
   striatum and hippocampus; small nuclei (PVH, DMH, ARH, MPN, DR, VTA, SNc ...)
   and the ventricles are painted on top with their real CCF volume.
5. A smooth seeded displacement field roughens every boundary, and the right
   half is mirrored so the hemispheres are exactly symmetric.
6. The reference is a float32 template with a mean intensity per region
   group, dark fibre tracts and ventricles, smooth seeded texture and a
   blurred edge.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import pandas as pd
from scipy import ndimage

from ketamap.atlas.core import LEFT, RIGHT, Atlas
from ketamap.atlas.ontology import Ontology
from ketamap.errors import ParameterError

__all__ = ["make_phantom", "PHANTOM_REGIONS", "PHANTOM_EXTENT_UM"]

logger = logging.getLogger(__name__)

#: Extent of the phantom volume in µm (AP, DV, LR), that of the Allen CCFv3.
PHANTOM_EXTENT_UM = (13200.0, 8000.0, 11400.0)
_MIDLINE_UM = PHANTOM_EXTENT_UM[2] / 2

# Real Allen CCFv3 ontology rows (structure_tree_safe_2017.csv): the phantom's
# labels and every ancestor up to the root. id, acronym, parent id, colour, name.
_REGIONS = """\
997,root,,FFFFFF,root
8,grey,997,BFDAE3,Basic cell groups and regions
567,CH,8,B0F0FF,Cerebrum
688,CTX,567,B0FFB8,Cerebral cortex
695,CTXpl,688,70FF70,Cortical plate
315,Isocortex,695,70FF71,Isocortex
184,FRP,315,268F45,Frontal pole cerebral cortex
500,MO,315,1F9D5A,Somatomotor areas
985,MOp,500,1F9D5A,Primary motor area
993,MOs,500,1F9D5A,Secondary motor area
453,SS,315,188064,Somatosensory areas
322,SSp,453,188064,Primary somatosensory area
378,SSs,453,188064,Supplemental somatosensory area
1057,GU,315,009C75,Gustatory areas
677,VISC,315,11AD83,Visceral area
247,AUD,315,019399,Auditory areas
669,VIS,315,08858C,Visual areas
31,ACA,315,40A666,Anterior cingulate area
972,PL,315,2FA850,Prelimbic area
44,ILA,315,59B363,Infralimbic area
714,ORB,315,248A5E,Orbital area
95,AI,315,219866,Agranular insular area
254,RSP,315,1AA698,Retrosplenial area
22,PTLp,315,009FAC,Posterior parietal association areas
541,TEa,315,15B0B3,Temporal association areas
922,PERI,315,0E9684,Perirhinal area
895,ECT,315,0D9F91,Ectorhinal area
698,OLF,695,9AD2BD,Olfactory areas
507,MOB,698,9AD2BD,Main olfactory bulb
151,AOB,698,9DF0D2,Accessory olfactory bulb
159,AON,698,54BF94,Anterior olfactory nucleus
961,PIR,698,6ACBBA,Piriform area
1089,HPF,695,7ED04B,Hippocampal formation
1080,HIP,1089,7ED04B,Hippocampal region
822,RHP,1089,32B825,Retrohippocampal region
703,CTXsp,688,8ADA87,Cortical subplate
623,CNU,567,98D6F9,Cerebral nuclei
477,STR,623,98D6F9,Striatum
485,STRd,477,98D6F9,Striatum dorsal region
672,CP,485,98D6F9,Caudoputamen
493,STRv,477,80CDF8,Striatum ventral region
56,ACB,493,80CDF8,Nucleus accumbens
754,OT,493,80CDF8,Olfactory tubercle
275,LSX,477,90CBED,Lateral septal complex
278,sAMY,477,80C0E2,Striatum-like amygdalar nuclei
803,PAL,623,8599CC,Pallidum
818,PALd,803,8599CC,Pallidum dorsal region
1022,GPe,818,8599CC,Globus pallidus external segment
835,PALv,803,A2B1D8,Pallidum ventral region
826,PALm,803,96A7D3,Pallidum medial region
809,PALc,803,B3C0DF,Pallidum caudal region
343,BS,8,FF7080,Brain stem
1129,IB,343,FF7080,Interbrain
549,TH,1129,FF7080,Thalamus
1097,HY,1129,E64438,Hypothalamus
157,PVZ,1097,FF5D50,Periventricular zone
38,PVH,157,FF5D50,Paraventricular hypothalamic nucleus
223,ARH,157,FF5D50,Arcuate hypothalamic nucleus
141,PVR,1097,FF5547,Periventricular region
830,DMH,141,FF5547,Dorsomedial nucleus of the hypothalamus
523,MPO,141,FF5547,Medial preoptic area
467,MEZ,1097,FF4C3E,Hypothalamic medial zone
88,AHN,467,FF4C3E,Anterior hypothalamic nucleus
331,MBO,467,FF4C3E,Mammillary body
515,MPN,467,FF4C3E,Medial preoptic nucleus
693,VMH,467,FF4C3E,Ventromedial hypothalamic nucleus
946,PH,467,FF4C3E,Posterior hypothalamic nucleus
290,LZ,1097,F2483B,Hypothalamic lateral zone
194,LHA,290,F2483B,Lateral hypothalamic area
226,LPO,290,F2483B,Lateral preoptic area
797,ZI,290,F2483B,Zona incerta
313,MB,343,FF64FF,Midbrain
339,MBsen,313,FF7AFF,Midbrain sensory related
302,SCs,339,FF7AFF,Superior colliculus sensory related
4,IC,339,FF7AFF,Inferior colliculus
323,MBmot,313,FF90FF,Midbrain motor related
381,SNr,323,FF90FF,Substantia nigra reticular part
749,VTA,323,FF90FF,Ventral tegmental area
128,MRN,323,FF90FF,Midbrain reticular nucleus
294,SCm,323,FF90FF,Superior colliculus motor related
795,PAG,323,FF90FF,Periaqueductal gray
348,MBsta,313,FF90FF,Midbrain behavioral state related
374,SNc,348,FFA6FF,Substantia nigra compact part
165,RAmb,348,FFA6FF,Midbrain raphe nuclei
872,DR,165,FFA6FF,Dorsal nucleus raphe
1065,HB,343,FF9B88,Hindbrain
771,P,1065,FF9B88,Pons
354,MY,1065,FF9BCD,Medulla
512,CB,8,F0F080,Cerebellum
528,CBX,512,F0F080,Cerebellar cortex
519,CBN,512,F0F080,Cerebellar nuclei
1009,fiber tracts,997,CCCCCC,fiber tracts
983,lfbs,1009,CCCCCC,lateral forebrain bundle system
776,cc,983,CCCCCC,corpus callosum
784,cst,983,CCCCCC,corticospinal tract
6,int,784,CCCCCC,internal capsule
924,cpd,784,CCCCCC,cerebal peduncle
484682512,scwm,1009,CCCCCC,supra-callosal cerebral white matter
73,VS,997,AAAAAA,ventricular systems
81,VL,73,AAAAAA,lateral ventricle
129,V3,73,AAAAAA,third ventricle
145,V4,73,AAAAAA,fourth ventricle
"""

# Region geometry, in µm, measured on the Allen CCFv3 2017 annotation (25 µm):
# centre (ap from the anterior face, dv from the dorsal face, ml = distance from
# the midline), standard deviations, correlations of the voxel coordinates, the
# real volume of both hemispheres together (mm³), how the region is drawn
# ("v": Voronoi cell, "p": painted at its real volume) and the Voronoi weight.
# Regions centred on the midline (ml = 0) are unpaired. VL is hand-placed (the
# body of the lateral ventricle only; real VL with its horns: 3.70 mm³).
_GEOMETRY = """\
acr     ap     dv     ml  sd_ap sd_dv sd_ml  r_ad  r_am  r_dm vol_mm3 mode w
FRP   2269   2774   1139   339   172   359 +0.40 +0.25 +0.39   0.968 v 1.13
MOs   3606   2107   1334   971   680   622 -0.68 -0.60 +0.77  13.104 v 1.01
MOp   4299   2357   2167   776   857   657 -0.75 -0.84 +0.78  11.350 v 1.05
SSp   5741   2061   2975   911   787   723 -0.64 -0.18 +0.57  24.305 v 1.10
SSs   6107   3351   4165   791   651   355 -0.72 +0.07 +0.05   9.027 v 1.21
GU    4660   4466   3740   522   240   377 +0.78 +0.55 +0.70   1.763 v 1.26
VISC  6303   4454   4439   502   237   321 -0.39 +0.17 -0.06   2.346 v 1.14
AI    4292   4669   3172  1282   511   828 +0.69 +0.90 +0.75   7.897 v 0.94
ACA   4612   2177    395   805   483   236 -0.47 -0.08 +0.18   5.535 v 1.22
PL    3108   2782    456   506   274   263 +0.55 +0.21 +0.17   2.410 v 1.17
ILA   3495   3712    372   194   279   221 +0.02 +0.30 -0.15   0.843 v 1.43
ORB   2862   3707   1033   415   436   543 +0.58 +0.29 +0.27   5.908 v 1.29
RSP   7959    994    822  1049   444   520 +0.18 +0.63 +0.16  10.481 v 0.99
PTLp  7478   1020   2464   355   320   623 +0.62 +0.83 +0.54   2.451 v 1.15
VIS   8995   1461   2849   701   656   822 +0.51 +0.35 +0.82  13.465 v 1.11
AUD   7859   2863   4472   454   498   333 -0.23 -0.02 +0.38   5.803 v 1.31
TEa   8279   3459   4567   717   662   319 -0.78 -0.22 +0.46   3.102 v 0.90
ECT   8033   4297   4586   663   373   267 -0.91 +0.19 -0.21   1.715 v 1.08
PERI  8229   4505   4671   696   416   202 -0.95 -0.15 +0.19   0.792 v 1.00
MOB   1372   4393    876   547   885   478 +0.27 -0.18 -0.16  16.467 v 1.04
AOB   1919   3662   1148   225   255   159 +0.32 -0.11 -0.05   0.651 p 1.00
AON   2812   5155   1065   414   546   382 +0.51 -0.38 -0.21   4.872 v 0.97
PIR   5613   6052   3365  1421   526   747 +0.45 +0.87 +0.24  11.572 v 0.66
HIP   7920   3329   2492   746  1208   977 +0.53 +0.73 +0.50  23.743 v 0.94
RHP   9244   4109   3507   626  1195   874 -0.21 +0.01 +0.60  18.497 v 0.85
CTXsp 6708   5834   3133  1237   562   532 +0.39 +0.45 -0.19   8.898 v 0.73
CP    5340   4205   2352   827   777   742 -0.14 +0.71 +0.11  26.025 v 1.07
ACB   4234   5809   1205   362   441   463 +0.35 +0.47 +0.40   4.385 v 1.05
OT    4383   6911   1584   544   282   604 +0.67 +0.49 +0.18   3.817 v 0.83
LSX   4918   4044    461   434   681   224 -0.72 +0.15 +0.02   3.563 v 1.20
sAMY  6615   6147   2314   505   477   373 -0.27 +0.17 -0.69   4.049 v 0.70
GPe   6134   4761   2274   367   341   409 -0.24 +0.91 -0.28   1.569 v 1.09
PALv  5041   6288   1544   679   398   485 -0.57 +0.58 -0.12   3.392 v 0.89
PALm  4992   5442    428   473  1225   421 -0.43 +0.43 +0.56   1.505 v 0.77
PALc  5359   5182    912   278   392   187 -0.12 +0.17 -0.25   1.350 v 1.07
TH    7010   4016   1277   679   620   735 -0.29 +0.49 -0.29  20.263 v 1.19
LHA   6671   5985   1221   555   270   226 -0.01 -0.45 +0.12   2.088 v 0.80
ZI    7363   4941   1567   541   340   491 -0.73 +0.62 -0.84   1.800 v 1.07
MBO   7930   6115    470   248   309   318 -0.46 -0.42 +0.46   1.021 v 0.90
SCs   9207   1557    702   483   266   426 -0.67 -0.01 +0.35   2.156 v 1.03
SCm   9145   2336    936   480   413   478 -0.55 -0.15 +0.50   5.657 v 1.15
IC   10377   2135   1276   347   542   468 -0.60 -0.58 +0.58   4.445 v 1.12
PAG   9326   3129    407   771   504   247 -0.44 +0.45 -0.08   4.674 v 1.05
MRN   8944   3921   1031   557   412   444 -0.19 -0.01 -0.24   5.144 v 0.92
SNr   8443   5170   1666   316   318   313 -0.56 +0.04 -0.60   1.551 v 1.06
P     9872   5535   1065   520   812   618 -0.42 +0.14 -0.05  16.699 v 0.95
MY   11735   5963   1209   793   758   695 +0.08 -0.17 -0.16  31.060 v 1.08
CBX  11697   3363   2044   755  1172  1214 -0.08 -0.33 +0.48  51.290 v 0.97
CBN  11505   3932   1690   288   274   605 -0.49 -0.51 +0.62   1.783 v 1.50
int   6654   4665   2168   568   644   429 +0.58 +0.39 -0.41   2.088 v 0.80
MPO   5260   6190    557   280   256   209 +0.00 +0.69 +0.32   0.556 p 1.00
AHN   6077   6315    540   248   256   163 -0.56 -0.15 +0.13   0.714 p 1.00
LPO   5400   6213   1051   306   252   208 -0.37 +0.78 -0.38   0.540 p 1.00
PH    7441   5582    317   226   371   180 -0.58 -0.50 +0.47   0.710 p 1.00
VMH   6806   6715    449   224   176   165 +0.22 +0.20 +0.26   0.550 p 1.00
MPN   5515   6174      0   183   240   345 -0.54 +0.00 +0.00   0.404 p 1.00
DMH   7049   6185    357   180   235   151 +0.69 -0.21 -0.18   0.376 p 1.00
ARH   6951   7062      0   289   127   242 -0.32 +0.00 +0.00   0.285 p 1.00
PVH   6063   5661      0   203   162   188 +0.52 +0.00 +0.00   0.187 p 1.00
cpd   8300   5462   1689   365   409   491 +0.00 -0.39 -0.81   0.897 p 1.00
VTA   8312   5154    754   205   201   215 -0.56 -0.31 +0.28   0.432 p 1.00
SNc   8362   5125   1405   328   273   240 -0.51 -0.12 -0.71   0.197 p 1.00
DR    9833   3824      0   231   326    63 +0.63 +0.00 +0.00   0.154 p 1.00
VL    5300   3300   1000   600   350   120 +0.30 +0.00 +0.00   1.800 p 1.00
V3    6394   3949      0   797  1325   281 -0.21 +0.00 +0.00   0.903 p 1.00
V4   11445   4743      0   454   509   300 +0.36 +0.00 +0.00   0.966 p 1.00
"""

# The brain body: moments of the real cerebrum + interbrain, olfactory bulb,
# cerebellum and brainstem (midbrain + hindbrain); volumes of both sides, mm³.
_BODY = """\
part      ap     dv     ml  sd_ap sd_dv sd_ml  r_ad  r_am  r_dm vol_mm3
cerebrum 6159   3837   2289  2005  1731  1298 -0.12 +0.40 +0.06 293.5
bulb     1392   4365    887   549   881   473 +0.23 -0.16 -0.18  17.1
cerebel 11677   3396   2030   756  1160  1194 -0.10 -0.32 +0.47  53.6
stem    10246   4706   1081  1396  1589   636 +0.49 +0.12 +0.12  83.9
"""

# Mean template intensity per group (first matching ancestor wins).
_INTENSITY = {
    "VS": 0.08,
    "fiber tracts": 0.28,
    "Isocortex": 0.55,
    "OLF": 0.62,
    "HPF": 0.66,
    "CTXsp": 0.50,
    "STR": 0.45,
    "PAL": 0.52,
    "TH": 0.63,
    "HY": 0.48,
    "MB": 0.58,
    "P": 0.70,
    "MY": 0.74,
    "CBX": 0.80,
    "CBN": 0.60,
}

# White matter between cortex and the striatum/hippocampus, µm.
_WM_INNER_UM = 120.0
_WM_OUTER_UM = 60.0
_WM_CORE = ("CP", "LSX", "HIP", "ACB")
_WM_CORTEX = ("Isocortex", "CTXsp", "RHP")

_RES_RANGE_UM = (20.0, 400.0)
# Each Voronoi region's own moment ellipsoid (scaled by this) is part of the brain body.
_ENVELOPE_REACH = 1.0
# Empty space kept between the brain and the faces of the box, µm.
_MARGIN_UM = 150.0


@functools.lru_cache(maxsize=1)
def _ontology() -> Ontology:
    rows = [line.split(",", 4) for line in _REGIONS.strip().splitlines()]
    table = pd.DataFrame(rows, columns=["id", "acronym", "parent_id", "color_hex", "name"])
    table["id"] = table["id"].astype(np.int64)
    table["parent_id"] = pd.array([int(p) if p else None for p in table["parent_id"]], "Int64")
    return Ontology(table[["id", "acronym", "name", "parent_id", "color_hex"]])


def _read_table(text: str) -> pd.DataFrame:
    lines = text.strip().splitlines()
    header = lines[0].split()
    rows = [line.split() for line in lines[1:]]
    df = pd.DataFrame(rows, columns=header)
    for col in header[1:]:
        if col != "mode":
            df[col] = df[col].astype(float)
    return df


@functools.lru_cache(maxsize=1)
def _geometry() -> pd.DataFrame:
    return _read_table(_GEOMETRY)


@functools.lru_cache(maxsize=1)
def _body() -> pd.DataFrame:
    return _read_table(_BODY)


def _precision(row, *, volume_mm3: float | None = None, weight: float = 1.0):
    """Centre and matrix P with d² = uᵀPu = 1 on the (scaled) moment ellipsoid."""
    sd = np.array([row.sd_ap, row.sd_dv, row.sd_ml])
    corr = np.array(
        [[1.0, row.r_ad, row.r_am], [row.r_ad, 1.0, row.r_dm], [row.r_am, row.r_dm, 1.0]]
    )
    cov = 5.0 * corr * np.outer(sd, sd)  # uniform ellipsoid with these moments: uᵀC⁻¹u ≤ 5
    if volume_mm3 is not None:
        unpaired = row.ml == 0
        target = volume_mm3 if unpaired else volume_mm3 / 2
        v0 = 4.0 / 3.0 * np.pi * np.sqrt(np.linalg.det(cov)) * 1e-9
        cov = cov * (target / v0) ** (2.0 / 3.0)
    cov = cov * weight**2
    centre = np.array([row.ap, row.dv, row.ml])
    return centre, np.linalg.inv(cov), cov


class _Grid:
    """Voxel-centre coordinates (µm) of the right half of the phantom box."""

    def __init__(self, resolution_um: float):
        self.res = resolution_um
        self.shape_full = tuple(int(round(e / resolution_um)) for e in PHANTOM_EXTENT_UM)
        n0, n1, n2 = self.shape_full
        self.n_half = (n2 + 1) // 2
        self.shape = (n0, n1, self.n_half)
        self.ap = (np.arange(n0) + 0.5) * resolution_um
        self.dv = (np.arange(n1) + 0.5) * resolution_um
        # asr: axis 2 runs right -> left; index 0 is the right edge.
        self.ml = (n2 / 2 - (np.arange(self.n_half) + 0.5)) * resolution_um

    def box(self, centre, cov, reach: float):
        """Index slices covering the ellipsoid uᵀC⁻¹u ≤ reach², or None if outside."""
        half = reach * np.sqrt(np.diag(cov))
        out = []
        for axis, coords in enumerate((self.ap, self.dv, self.ml)):
            lo, hi = centre[axis] - half[axis], centre[axis] + half[axis]
            if axis == 2:  # ml decreases with the index
                i0 = int(np.searchsorted(-coords, -hi, side="left"))
                i1 = int(np.searchsorted(-coords, -lo, side="right"))
            else:
                i0 = int(np.searchsorted(coords, lo, side="left"))
                i1 = int(np.searchsorted(coords, hi, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def dist2(self, centre, prec, box) -> np.ndarray:
        """Quadratic form uᵀPu over a box, float32, by broadcasting 1-D axes."""
        u0 = (self.ap[box[0]] - centre[0]).astype(np.float32)[:, None, None]
        u1 = (self.dv[box[1]] - centre[1]).astype(np.float32)[None, :, None]
        u2 = (self.ml[box[2]] - centre[2]).astype(np.float32)[None, None, :]
        p = prec.astype(np.float32)
        a01 = p[0, 0] * u0 * u0 + 2 * p[0, 1] * u0 * u1 + p[1, 1] * u1 * u1
        a02 = 2 * p[0, 2] * u0 * u2
        a12 = p[2, 2] * u2 * u2 + 2 * p[1, 2] * u1 * u2
        return a01 + a02 + a12


def _smooth_noise(rng: np.random.Generator, grid: _Grid, spacing_um: float) -> np.ndarray:
    """Smooth, unit-variance random field on the half grid (float32).

    Values are drawn on a coarse lattice fixed in physical space (so phantoms
    at different resolutions share their anatomy) and interpolated with
    Gaussian weights, one separable matrix product per axis.
    """
    mats = []
    for coords, extent in zip((grid.ap, grid.dv, grid.ml), PHANTOM_EXTENT_UM):
        nodes = np.arange(-2, int(np.ceil(extent / spacing_um)) + 3) * spacing_um
        if coords is grid.ml:
            nodes = nodes - extent / 2
        w = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / (0.6 * spacing_um)) ** 2)
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    coarse = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    field = np.tensordot(mats[0], coarse, axes=(1, 0))
    field = np.tensordot(field, mats[1], axes=(1, 1)).transpose(0, 2, 1)
    field = np.tensordot(field, mats[2], axes=(2, 1))
    std = float(field.std()) or 1.0
    return field / np.float32(std)


def _labels_half(grid: _Grid, rng: np.random.Generator, weights=None):
    """Label indices (into the returned acronym list) on the right half grid."""
    geo = _geometry()
    onto = _ontology()
    names = ["<outside>"] + list(geo["acr"])
    index = {a: i for i, a in enumerate(names)}

    envelope = np.zeros(grid.shape, dtype=bool)
    for row in _body().itertuples(index=False):
        centre, prec, cov = _precision(row, volume_mm3=row.vol_mm3)
        box = grid.box(centre, cov, 1.0)
        if box is not None:
            envelope[box] |= grid.dist2(centre, prec, box) <= 1.0

    painted = geo[geo["mode"] == "p"].sort_values("vol_mm3", ascending=False)
    shapes = []
    for row in painted.itertuples(index=False):
        centre, prec, cov = _precision(row, volume_mm3=row.vol_mm3)
        box = grid.box(centre, cov, 1.0)
        if box is not None:
            shapes.append((row.acr, box, grid.dist2(centre, prec, box) <= 1.0))
            envelope[box] |= shapes[-1][2]

    best = np.full(grid.shape, np.inf, dtype=np.float32)
    lab = np.zeros(grid.shape, dtype=np.uint8)
    for row in geo[geo["mode"] == "v"].itertuples(index=False):
        w = row.w if weights is None else weights.get(row.acr, row.w)
        centre, prec, cov = _precision(row, weight=w)
        box = grid.box(centre, cov, 3.0)
        if box is None:
            continue
        d2 = grid.dist2(centre, prec, box)
        envelope[box] |= d2 <= _ENVELOPE_REACH**2
        sub_best, sub_lab = best[box], lab[box]
        better = d2 < sub_best
        sub_best[better] = d2[better]
        sub_lab[better] = index[row.acr]
    _clear_margin(envelope, grid)
    lab[~envelope] = 0
    missing = envelope & (lab == 0)
    if missing.any():  # far from every ellipsoid: take the nearest labelled voxel
        _, idx = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        lab[missing] = lab[tuple(i[missing] for i in idx)]

    # White matter: cortex voxels within a few hundred µm of striatum/hippocampus.
    def ids_under(acronyms):
        keep = set()
        for a in acronyms:
            keep.update(onto.descendants(onto.lookup(a), include_self=True))
        return np.array([onto.lookup(a) in keep for a in names[1:]], dtype=bool)

    is_core = np.concatenate([[False], ids_under(_WM_CORE)])
    is_ctx = np.concatenate([[False], ids_under(_WM_CORTEX)])
    core = is_core[lab]
    cortex = is_ctx[lab]
    n_in = max(1, int(round(_WM_INNER_UM / grid.res)))
    n_out = n_in + max(1, int(round(_WM_OUTER_UM / grid.res)))
    grown = ndimage.binary_dilation(core, iterations=n_in)
    outer = ndimage.binary_dilation(grown, iterations=n_out - n_in)
    names += ["cc", "scwm"]
    lab[outer & ~grown & cortex] = len(names) - 1
    lab[grown & cortex] = len(names) - 2

    # Small nuclei and ventricles at their real volume, largest first.
    for acr, box, inside in shapes:
        lab[box][inside & envelope[box]] = index[acr]
    return lab, names


def _clear_margin(volume: np.ndarray, grid: _Grid) -> None:
    """Zero a thin layer along the faces of the box (in place; not at the midline)."""
    m = max(1, int(round(_MARGIN_UM / grid.res)))
    volume[:m] = volume[-m:] = 0
    volume[:, :m] = volume[:, -m:] = 0
    volume[:, :, :m] = 0


def _warp(lab: np.ndarray, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Roughen boundaries: resample labels through a smooth random displacement."""
    disp = [
        _smooth_noise(rng, grid, 900.0) * np.float32(110.0 / grid.res)
        + _smooth_noise(rng, grid, 350.0) * np.float32(45.0 / grid.res)
        for _ in range(3)
    ]
    # No lateral shift at the midline, so unpaired midline regions (DR, V3) survive.
    disp[2] = disp[2] * np.clip(grid.ml / 800.0, 0.0, 1.0).astype(np.float32)
    idx = []
    for axis, d in enumerate(disp):
        base = np.arange(grid.shape[axis], dtype=np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        pos = np.rint(base.reshape(shape) + d).astype(np.intp)
        idx.append(np.clip(pos, 0, grid.shape[axis] - 1))
    return lab[tuple(idx)]


def _mirror(half: np.ndarray, n2: int) -> np.ndarray:
    return np.concatenate([half, half[:, :, ::-1][:, :, n2 % 2 :]], axis=2)


def _reference(lab: np.ndarray, names, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Synthetic float32 template on the half grid."""
    onto = _ontology()
    lut = np.zeros(len(names), dtype=np.float32)
    group_ids = {onto.lookup(k): v for k, v in _INTENSITY.items()}
    for i, acr in enumerate(names[1:], start=1):
        rid = onto.lookup(acr)
        chain = onto.ancestors(rid, include_self=True)[::-1]
        base = next((group_ids[a] for a in chain if a in group_ids), 0.55)
        jitter = ((rid * 2654435761) % 1000) / 1000.0 - 0.5  # stable per region
        lut[i] = base * (1.0 + 0.12 * jitter)
    ref = lut[lab]
    texture = 0.07 * _smooth_noise(rng, grid, 400.0) + 0.04 * _smooth_noise(rng, grid, 150.0)
    ref *= 1.0 + texture
    sigma = max(0.6, 60.0 / grid.res)
    ref = ndimage.gaussian_filter(ref, sigma=sigma, mode="nearest")
    return np.clip(ref, 0.0, None).astype(np.float32, copy=False)


def make_phantom(*, resolution_um: float = 50.0, seed: int = 0) -> Atlas:
    """Build the synthetic mouse-brain atlas.

    Parameters
    ----------
    resolution_um : float
        Isotropic voxel size in µm, between 20 and 400. The volume always
        spans the CCFv3 box (13.2 x 8.0 x 11.4 mm): 264 x 160 x 228 voxels
        at 50 µm, 132 x 80 x 114 at 100 µm.
    seed : int
        Seed of the boundary irregularity and of the template texture. The
        same seed and resolution always give the same atlas.

    Returns
    -------
    Atlas
        Name ``"ketamap_phantom_<res>um"``, orientation ``"asr"``, uint32
        annotation with real Allen ids, symmetric hemispheres (1 = left,
        2 = right) and a float32 reference.

    Raises
    ------
    ParameterError
        If ``resolution_um`` is outside [20, 400] or ``seed`` is not an int.

    Examples
    --------
    >>> atlas = make_phantom(resolution_um=100)
    >>> atlas.shape
    (132, 80, 114)
    >>> atlas.ontology.acronym(atlas.ontology.parent(749))
    'MBmot'
    """
    if isinstance(resolution_um, bool) or not isinstance(resolution_um, (int, float)):
        raise ParameterError(f"make_phantom resolution_um must be a number, got {resolution_um!r}.")
    lo, hi = _RES_RANGE_UM
    if not lo <= float(resolution_um) <= hi:
        raise ParameterError(
            f"make_phantom resolution_um must be between {lo:g} and {hi:g} µm, "
            f"got {resolution_um!r}."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"make_phantom seed must be a non-negative int, got {seed!r}.")
    t0 = time.perf_counter()
    res = float(resolution_um)
    grid = _Grid(res)
    rng = np.random.default_rng(int(seed))
    lab, names = _labels_half(grid, rng)
    lab = _warp(lab, grid, rng)
    _clear_margin(lab, grid)
    parts, n_parts = ndimage.label(lab > 0)
    if n_parts > 1:  # drop islands the ellipsoids left outside the body
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        lab[parts != int(sizes.argmax())] = 0
    ref_half = _reference(lab, names, grid, rng)

    onto = _ontology()
    ids = np.array([0] + [onto.lookup(a) for a in names[1:]], dtype=np.uint32)
    n2 = grid.shape_full[2]
    annotation = _mirror(ids[lab], n2)
    reference = _mirror(ref_half, n2)
    hemispheres = np.full(grid.shape_full, RIGHT, dtype=np.uint8)
    hemispheres[:, :, n2 // 2 :] = LEFT  # asr: axis 2 runs right -> left
    atlas = Atlas(
        name=f"ketamap_phantom_{res:g}um",
        annotation=annotation,
        hemispheres=hemispheres,
        resolution_um=(res, res, res),
        orientation="asr",
        ontology=onto,
        reference=reference,
    )
    logger.debug("phantom at %g µm built in %.2f s", res, time.perf_counter() - t0)
    return atlas


def _labelled_acronyms() -> tuple[str, ...]:
    geo = _geometry()
    return tuple(sorted(list(geo["acr"]) + ["cc", "scwm"], key=str.lower))


#: Acronyms of every region that labels voxels of the phantom annotation
#: (the phantom's leaves). Their ancestors are in the phantom ontology too.
PHANTOM_REGIONS: tuple[str, ...] = _labelled_acronyms()
