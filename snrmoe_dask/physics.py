"""PFS-like forward model: NumPy kernels only (no dask, no xarray).

The model is deliberately *physically motivated*, not fitted to labels:

* the continuum is a photon-counting Planck spectrum ``lambda * B_lambda(T)``
  normalised to an AB-like magnitude in a reference band bluer than the arm
  (so cool and hot stars of equal magnitude differ in red counts), times a
  throughput curve peaked near 8000 A;
* absorption follows ``r = 1 - D_max * (1 - exp(-tau))`` with
  ``tau = eta(labels) @ B``: ``B`` is a fixed basis of line profiles (Gaussian
  cores convolved with the line-spread function, Lorentzian pressure wings,
  TiO band heads and a forest of weak lines) and ``eta`` are line strengths
  from a Saha-Boltzmann-like scaling with abundance, excitation, ionisation
  and gravity (Gray, *The Observation and Analysis of Stellar Photospheres*,
  ch. 13): ions scale as ``g**-1/3``, neutrals of ionised metals are pressure
  insensitive in the core, damping wings grow as ``g**1/3``, molecules grow
  with pressure;
* the variance is source + sky (continuum and OH lines, stronger to the red)
  + read noise, plus a 1 % sky-subtraction systematic.

Because the Poisson source term carries the star's own spectrum, the error
vector leaks the labels -- the leak :mod:`snrmoe_dask.audit` must find.

Every function here works on one block of spectra; :mod:`snrmoe_dask.simulate`
maps them over a dask array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = [
    "LABELS",
    "Instrument",
    "ForwardModel",
    "default_wavelength",
    "forward_model",
    "true_snr",
]

#: Labels the forward model depends on, in order.
LABELS = ("teff", "logg", "mh", "alpha_m", "mag")

_HC_OVER_K = 1.438777e8  # h c / k in Angstrom * K
_THETA_REF = 5040.0 / 5000.0
_LOGG_REF = 4.44
_LN10 = np.log(10.0)


@dataclass(frozen=True)
class Instrument:
    """PFS medium-resolution red arm, as docs/method.md (the simulator) describes it."""

    wave_min: float = 7100.0
    wave_max: float = 8850.0
    n_pixels: int = 4096
    lsf_fwhm: float = 1.37  # Angstrom
    n_exposures: int = 4
    exposure_s: float = 900.0
    read_noise: float = 4.0  # e- per pixel per exposure
    n_spatial: int = 4  # detector rows summed per spectral pixel
    throughput_peak: float = 8000.0
    throughput_width: float = 1100.0
    #: source counts per pixel at the throughput peak for a mag-21.5 star of
    #: reference colour; calibrated so the S/N distribution matches the target
    #: distribution of docs/method.md (the simulator).
    counts_ref: float = 66.5
    #: sky continuum counts per pixel at 8000 A (dark sky, 1.1" fibre).
    sky_continuum: float = 95.0
    #: reference band for the magnitude (a bluer, r-like band).
    ref_band: tuple[float, float] = (5400.0, 6600.0)
    sky_systematic: float = 0.01
    max_depth: float = 0.85


def default_wavelength(instrument: Instrument | None = None) -> np.ndarray:
    """Wavelength grid of the arm, shape (n_pixels,), Angstrom, float64."""
    ins = instrument or Instrument()
    return np.linspace(ins.wave_min, ins.wave_max, ins.n_pixels)


# --------------------------------------------------------------------------
# Line list.  Each *group* shares one strength law; its basis row is the sum
# of its lines' profiles weighted by relative gf.  Columns:
#   name, lines [(wavelength, relative gf)], log eta_ref, excitation chi (eV),
#   ionisation potential of the neutral (eV, 0 for ions), alpha weight,
#   gravity exponent gamma (core), wing factor (0 = no wing), kind
# --------------------------------------------------------------------------
_CORE_GROUPS: tuple[tuple, ...] = (
    ("K I", [(7664.90, 1.0), (7698.96, 0.5)], 0.3, 0.00, 4.34, 0.0, 0.0, 1.0, "neutral"),
    ("Na I", [(8183.26, 0.7), (8194.82, 1.0)], 0.0, 2.10, 5.14, 0.0, 0.0, 1.0, "neutral"),
    ("Ca II", [(8498.02, 0.35), (8542.09, 1.0), (8662.14, 0.75)], 0.8, 1.69, 0.0, 1.0, -1.0 / 3.0, 0.3, "ion"),
    ("Mg I", [(8806.76, 1.0)], 0.2, 4.35, 7.65, 1.0, 0.0, 0.5, "neutral"),
    ("Fe I low", [(8327.05, 1.0), (8387.77, 1.0), (8468.41, 0.8), (8514.07, 0.7), (8824.22, 0.9),
                  (7445.75, 0.5), (7495.07, 0.6), (8047.62, 0.4)],
     -0.3, 2.2, 7.90, 0.0, 0.0, 0.05, "neutral"),
    ("Fe I high", [(8611.80, 0.8), (8688.62, 1.0), (7511.02, 0.7), (7748.27, 0.6), (7780.56, 0.6),
                   (8674.75, 0.5), (8621.60, 0.4)], -0.4, 4.0, 7.90, 0.0, 0.0, 0.0, "neutral"),
    ("Ti I", [(8434.96, 1.0), (8426.50, 0.8), (8382.53, 0.6), (7344.70, 0.5)],
     -0.9, 0.85, 6.83, 0.5, 0.0, 0.0, "neutral"),
    ("O I", [(7771.94, 1.0), (7774.17, 0.85), (7775.39, 0.65)], -1.8, 9.15, 0.0, 1.0, -0.2, 0.0, "mostly_neutral"),
    ("Paschen", [(8750.47, 1.0), (8665.02, 0.85), (8598.39, 0.7), (8545.38, 0.6), (8502.48, 0.5),
                 (8467.25, 0.42), (8437.96, 0.35), (8413.32, 0.3)],
     -2.4, 12.09, 0.0, 0.0, -0.15, 0.5, "mostly_neutral"),
)

#: TiO band heads (A) that fall in or just blueward of the arm.
_TIO_HEADS = (7054.0, 7589.0, 7666.0, 8206.0, 8432.0, 8442.0, 8452.0)
#: TiO: log eta_ref (at 5000 K, so tiny), effective energy (dissociation +
#: ionisation balance), alpha weight (Ti and O are alpha-like), gamma.
_TIO_LAW = (-3.3, 8.0, 1.2, 0.25)

#: Weak-line forest groups: name, n_lines, log eta_ref, chi, IP, alpha weight, gamma.
_FOREST_GROUPS: tuple[tuple, ...] = (
    ("forest Fe low-chi", 140, -1.7, 1.5, 7.90, 0.0, 0.0),
    ("forest Fe high-chi", 140, -1.8, 4.0, 7.90, 0.0, 0.0),
    ("forest Ti/V", 80, -2.4, 0.8, 6.80, 0.4, 0.0),
    ("forest Si/Ca", 60, -2.1, 5.5, 8.15, 1.0, 0.0),
    ("forest CN", 120, -2.8, 0.5, 0.0, 0.0, -0.35),
)


def _gaussian(wave: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((wave - centre) / sigma) ** 2)


def _lorentzian_wing(wave: np.ndarray, centre: float, hwhm: float) -> np.ndarray:
    return hwhm**2 / ((wave - centre) ** 2 + hwhm**2)


@dataclass(frozen=True)
class _Group:
    name: str
    log_eta_ref: float
    energy: float  # d log10(eta) / d theta
    alpha_weight: float
    metal_weight: float
    gamma: float
    t_power: float


@lru_cache(maxsize=8)
def _build_basis(instrument: Instrument) -> tuple[tuple[_Group, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Return (groups, basis (K, P), sky counts (P,), throughput (P,)).

    Everything here is an instrument or atomic constant, built once with a
    fixed seed (the line forest and OH line list are *not* per-spectrum).
    """
    wave = default_wavelength(instrument)
    sigma_lsf = instrument.lsf_fwhm / 2.3548
    sigma_core = float(np.hypot(sigma_lsf, 0.25))  # LSF (+) thermal/micro-turbulent core
    groups: list[_Group] = []
    rows: list[np.ndarray] = []

    def add(group: _Group, profile: np.ndarray) -> None:
        groups.append(group)
        rows.append(profile)

    for name, lines, log_eta, chi, ip, alpha_w, gamma, wing, kind in _CORE_GROUPS:
        # Saha-Boltzmann-like temperature sensitivity relative to the H-
        # continuum (binding 0.75 eV): neutrals of mostly ionised elements
        # gain IP - chi per unit theta, dominant stages lose chi.
        energy = (ip - chi - 0.75) if kind == "neutral" else (-chi - 0.75)
        core = sum(gf * _gaussian(wave, lam, sigma_core) for lam, gf in lines)
        add(_Group(name, log_eta, energy, alpha_w, 1.0, gamma, 0.0), core)
        if wing > 0:
            # pressure (van der Waals / Stark) wings: damping constant ~ g^(1/3)
            prof = sum(gf * _lorentzian_wing(wave, lam, 0.6) for lam, gf in lines)
            add(_Group(name + " wing", log_eta + np.log10(wing), energy, alpha_w, 1.0, gamma + 1.0 / 3.0, 0.3), prof)

    # TiO bands: sharp head, exponential decline redward, rotational structure.
    tio = np.zeros_like(wave)
    for head in _TIO_HEADS:
        d = wave - head
        band = np.where(d >= 0, np.exp(-np.clip(d, 0, None) / 45.0), 0.0)
        tio += band * (0.75 + 0.25 * np.cos(2 * np.pi * d / 2.3))
    log_eta, energy, alpha_w, gamma = _TIO_LAW
    add(_Group("TiO", log_eta, energy, alpha_w, 2.0, gamma, 0.0), tio)

    rng = np.random.default_rng(20251226)  # atomic data: fixed for all catalogs
    for name, n_lines, log_eta, chi, ip, alpha_w, gamma in _FOREST_GROUPS:
        lam = rng.uniform(instrument.wave_min - 5, instrument.wave_max + 5, n_lines)
        gf = 10.0 ** rng.normal(0.0, 0.35, n_lines)
        prof = np.zeros_like(wave)
        for c, g in zip(lam, gf):
            lo, hi = np.searchsorted(wave, [c - 6 * sigma_core, c + 6 * sigma_core])
            prof[lo:hi] += g * _gaussian(wave[lo:hi], c, sigma_core)
        energy = (ip - chi - 0.75) if ip > 0 else (4.0 - chi)  # CN: molecular
        add(_Group(name, log_eta, energy, alpha_w, 1.0, gamma, 0.0), prof)

    basis = np.vstack(rows)

    # Sky: continuum rising to the red plus dense OH Meinel bands.
    sky = instrument.sky_continuum * (wave / 8000.0) ** 2
    oh_rng = np.random.default_rng(31415)
    n_oh = 260
    oh_lam = np.sort(oh_rng.uniform(instrument.wave_min, instrument.wave_max, n_oh))
    oh_int = 10.0 ** oh_rng.normal(0.0, 0.5, n_oh) * 60.0 * (oh_lam / 7100.0) ** 6
    for c, a in zip(oh_lam, oh_int):
        lo, hi = np.searchsorted(wave, [c - 6 * sigma_lsf, c + 6 * sigma_lsf])
        sky[lo:hi] += a * _gaussian(wave[lo:hi], c, sigma_lsf)

    throughput = np.exp(-0.5 * ((wave - instrument.throughput_peak) / instrument.throughput_width) ** 2)
    return tuple(groups), basis, sky, throughput


def _photon_planck(wave: np.ndarray, teff: np.ndarray) -> np.ndarray:
    """Photon spectrum ``lambda * B_lambda(T)`` up to a constant, shape (n, P).

    Computed in one (n, P) buffer (the Bayes ceiling calls this for ~2,000
    samples per spectrum; every fresh 8 MB temporary cost page faults).
    """
    x = np.multiply(wave[None, :], teff[:, None])
    np.divide(x.dtype.type(_HC_OVER_K), x, out=x)
    np.expm1(x, out=x)
    return np.divide((wave[None, :] / wave.dtype.type(8000.0)) ** -4, x, out=x)


def _ref_band_flux(instrument: Instrument, teff: np.ndarray) -> np.ndarray:
    band = np.linspace(*instrument.ref_band, 40)
    return _photon_planck(band, teff).mean(axis=1)


@lru_cache(maxsize=8)
def _ref_shape(instrument: Instrument) -> float:
    """The photon spectrum of a 5000 K star at the throughput peak, relative to its reference band."""
    peak = _photon_planck(np.array([instrument.throughput_peak]), np.array([5000.0]))[0, 0]
    return float(peak / _ref_band_flux(instrument, np.array([5000.0]))[0])


@lru_cache(maxsize=8)
def _constants(instrument: Instrument, precision: str) -> tuple[np.ndarray, ...]:
    """(wavelength, basis, sky, throughput) in ``precision``, read-only."""
    _, basis, sky, throughput = _build_basis(instrument)
    out = tuple(a.astype(precision) for a in (default_wavelength(instrument), basis, sky, throughput))
    for a in out:
        a.flags.writeable = False
    return out


@dataclass(frozen=True)
class ForwardModel:
    """Noiseless flux and 1-sigma error for given labels.

    Parameters
    ----------
    instrument : Instrument
        Instrument constants.
    noise_level : float
        Multiplies sigma: ``error = noise_level * sigma``.
    precision : {"float64", "float32"}
        Arithmetic of the (n, P) arrays. The simulator uses float64; the Bayes
        ceiling may evaluate its ~1,500 proposals per spectrum in float32
        (twice the SIMD width for ``expm1`` and ``sqrt``; flux to ~1e-6 relative).
        The per-spectrum line strengths are computed in float64 either way.
    """

    instrument: Instrument = field(default_factory=Instrument)
    noise_level: float = 1.0
    precision: str = "float64"

    def __post_init__(self) -> None:
        if self.precision not in ("float64", "float32"):
            raise ValueError(f"precision must be 'float64' or 'float32', got {self.precision!r}")

    @property
    def wavelength(self) -> np.ndarray:
        return default_wavelength(self.instrument)

    @property
    def n_groups(self) -> int:
        return len(_build_basis(self.instrument)[0])

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in _build_basis(self.instrument)[0])

    def log_strengths(self, teff, logg, mh, alpha_m) -> np.ndarray:
        """log10 line strengths eta of every basis group, shape (n, K)."""
        groups = _build_basis(self.instrument)[0]
        theta = 5040.0 / np.asarray(teff, dtype=np.float64)
        logg = np.asarray(logg, dtype=np.float64)
        mh = np.asarray(mh, dtype=np.float64)
        alpha_m = np.asarray(alpha_m, dtype=np.float64)
        out = np.empty((theta.shape[0], len(groups)))
        for k, g in enumerate(groups):
            out[:, k] = (
                g.log_eta_ref
                + g.metal_weight * mh
                + g.alpha_weight * alpha_m
                + g.energy * (theta - _THETA_REF)
                + g.gamma * (logg - _LOGG_REF)
                + g.t_power * np.log10(_THETA_REF / theta)
            )
        return out

    def continuum(self, teff, mag) -> np.ndarray:
        """Stellar continuum counts per pixel (before absorption), shape (n, P)."""
        ins = self.instrument
        wave, _, _, throughput = _constants(ins, self.precision)
        teff = np.asarray(teff, dtype=np.float64)
        mag = np.asarray(mag, dtype=np.float64)
        shape = _photon_planck(wave, teff.astype(self.precision))
        shape /= _ref_band_flux(ins, teff).astype(self.precision)[:, None]
        scale = ins.counts_ref * 10.0 ** (-0.4 * (mag - 21.5)) / _ref_shape(ins)
        shape *= scale.astype(self.precision)[:, None]
        shape *= throughput[None, :]
        return shape

    def __call__(self, teff, logg, mh, alpha_m, mag) -> tuple[np.ndarray, np.ndarray]:
        """Noiseless flux and error, each of shape (n, P), in ``precision``.

        Parameters
        ----------
        teff, logg, mh, alpha_m, mag : array_like of shape (n,)
            Labels and magnitude.
        """
        ins = self.instrument
        _, basis, _, _ = _constants(ins, self.precision)
        eta = (10.0 ** self.log_strengths(teff, logg, mh, alpha_m)).astype(self.precision)
        # absorption factor 1 - depth (1 - exp(-tau)) = 1 + depth expm1(-tau), in tau's buffer
        depth = eta @ basis
        np.negative(depth, out=depth)
        np.expm1(depth, out=depth)
        depth *= depth.dtype.type(ins.max_depth)
        depth += 1
        flux = self.continuum(teff, mag)
        flux *= depth
        return flux, self.sigma(flux)

    def sigma(self, flux: np.ndarray) -> np.ndarray:
        """1-sigma error for noiseless source counts ``flux`` (n, P)."""
        ins = self.instrument
        _, _, sky, _ = _constants(ins, flux.dtype.name)
        read_var = ins.n_exposures * ins.n_spatial * ins.read_noise**2
        var = np.clip(flux, 0.0, None)
        var += sky[None, :]
        var += read_var
        var += (ins.sky_systematic * sky[None, :]) ** 2
        np.sqrt(var, out=var)
        var *= var.dtype.type(self.noise_level)
        return var


def forward_model(labels: dict[str, np.ndarray], *, noise_level: float = 1.0,
                  instrument: Instrument | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless flux and error for a dict of label arrays (see :data:`LABELS`).

    Returns
    -------
    flux, error : ndarray of shape (n, n_pixels), float64
    """
    missing = [k for k in LABELS if k not in labels]
    if missing:
        raise ValueError(f"forward_model needs labels {LABELS}; missing {missing}")
    model = ForwardModel(instrument or Instrument(), noise_level)
    return model(*(np.atleast_1d(np.asarray(labels[k], dtype=np.float64)) for k in LABELS))


def true_snr(flux: np.ndarray, error: np.ndarray) -> np.ndarray:
    """True S/N: median over pixels of noiseless flux / error, shape (n,)."""
    return np.median(flux / error, axis=1)
