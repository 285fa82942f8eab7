"""Soft gates over experts: NumPy kernels, their fits, and their storage form.

A gate maps a spectrum's small feature vector to weights ``p`` over ``K``
experts; the mixture is ``yhat = sum_k p_k yhat_k``. If
``max p < tau`` the mixture falls back to the ``global`` expert.

Every fitted gate is evaluated by one of three forward kernels:

* ``linear``: ``z = X W^T + b``;
* ``mlp``: two ``tanh`` hidden layers, then a linear layer;
* ``temp``: ``z = (X_phys W^T + b) / tau(q)``, ``tau(q) = 1 + softplus(q c + d) >= 1``;

and ``p = softmax(z)``. How a gate is *trained* is what tells them apart:

==========================  =============  ========  =========================================
gate                        experts        forward   training
==========================  =============  ========  =========================================
``deploy_snr_logreg``       ``oracle_snr`` linear    multinomial logistic regression (sklearn)
``deploy_snr_regress``      ``oracle_snr`` linear    minimises the MSE of the mixed logg
``deploy_phys``             ``oracle_phys`` linear   logistic regression on physical features
``deploy_dual_concat``      ``oracle_phys`` mlp      MLP [32, 16] on [phys, quality], MSE
``deploy_dual_logitadd``    ``oracle_phys`` linear   a(phys) + b(quality), warm start, MSE
``deploy_dual_poe``         ``oracle_phys`` linear   softmax(a) * softmax(b), two classifiers
``deploy_dual_temp``        ``oracle_phys`` temp     a(phys) fixed classifier, tau(q) by MSE
``deploy_joint``            ``hierarchical`` linear  logistic regression → 36 cells
==========================  =============  ========  =========================================

(Linear towers that add logits are a linear gate on the concatenated inputs,
and so is a product of two softmaxes; what differs is the fit.) Gradients of
the MSE gates are written out by hand (no library offers a mixture-of-experts
loss) and checked against finite differences in the tests; the optimiser is
scipy's L-BFGS.

Inputs are standardised: columns that are positive on the training rows are
log-transformed first, NaN is replaced by the training median.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, softmax

__all__ = ["GATE_SPECS", "GateSpec", "Gate", "Standardizer", "fit_gate", "mixture", "mixture_sigma",
           "entropy", "ORACLE_OF"]

_BIG = 30.0  # logit offset that stands for "impossible" (absent class)


@dataclass(frozen=True)
class GateSpec:
    """What a gate mixes, from which inputs, and how it is trained."""

    name: str
    family: str
    inputs: tuple[str, ...]
    training: str
    hidden: tuple[int, ...] = ()


GATE_SPECS: dict[str, GateSpec] = {s.name: s for s in (
    GateSpec("deploy_snr_logreg", "oracle_snr", ("quality",), "logreg"),
    GateSpec("deploy_snr_regress", "oracle_snr", ("quality",), "mse_linear"),
    GateSpec("deploy_phys", "oracle_phys", ("physical",), "logreg"),
    GateSpec("deploy_dual_concat", "oracle_phys", ("physical", "quality"), "mse_mlp", (32, 16)),
    GateSpec("deploy_dual_logitadd", "oracle_phys", ("physical", "quality"), "logitadd"),
    GateSpec("deploy_dual_poe", "oracle_phys", ("physical", "quality"), "poe"),
    GateSpec("deploy_dual_temp", "oracle_phys", ("physical", "quality"), "temp"),
    GateSpec("deploy_joint", "hierarchical", ("physical", "quality"), "logreg"),
)}

#: the oracle each gate's rho is measured against (same experts, true routing)
ORACLE_OF = {"oracle_snr": "oracle_snr", "oracle_phys": "oracle_phys", "hierarchical": "hierarchical"}


# ---------------------------------------------------------------- inputs
@dataclass
class Standardizer:
    """log (for positive columns) -> median-impute -> standardise."""

    log: np.ndarray
    median: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x = np.asarray(x, np.float64)
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(x)
            log = np.array([bool(np.all(x[finite[:, j], j] > 0)) and finite[:, j].any() for j in range(x.shape[1])])
        t = cls._log(x, log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (e.g. line off the grid) -> 0
            median = np.nanmedian(np.where(np.isfinite(t), t, np.nan), axis=0) if t.size else np.zeros(x.shape[1])
        median = np.where(np.isfinite(median), median, 0.0)
        t = np.where(np.isfinite(t), t, median)
        mean, scale = t.mean(axis=0), t.std(axis=0)
        return cls(log, median, mean, np.where(scale > 0, scale, 1.0))

    @staticmethod
    def _log(x: np.ndarray, log: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(log, np.log(np.where(log & (x > 0), x, 1.0)) + np.where(log & ~(x > 0), np.nan, 0.0), x)

    def transform(self, x: np.ndarray) -> np.ndarray:
        t = self._log(np.asarray(x, np.float64), self.log)
        t = np.where(np.isfinite(t), t, self.median)
        return (t - self.mean) / self.scale


# ---------------------------------------------------------------- kernels
def _linear(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return x @ params["W"].T + params["b"]


def _mlp_forward(params: Mapping[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    acts = [x]
    h = x
    n_layers = sum(1 for k in params if k.startswith("W"))
    for i in range(n_layers - 1):
        h = np.tanh(h @ params[f"W{i}"].T + params[f"b{i}"])
        acts.append(h)
    return h @ params[f"W{n_layers - 1}"].T + params[f"b{n_layers - 1}"], acts


def _temperature(params: Mapping[str, np.ndarray], q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = q @ params["c"] + params["d"][0]
    return 1.0 + np.logaddexp(0.0, u), u


def gate_logits(kind: str, params: Mapping[str, np.ndarray], x_phys: np.ndarray | None,
                x_all: np.ndarray, x_qual: np.ndarray | None) -> np.ndarray:
    """Logits (n, K) of a gate's forward kernel."""
    if kind == "linear":
        return _linear(params, x_all)
    if kind == "mlp":
        return _mlp_forward(params, x_all)[0]
    if kind == "temp":
        tau, _ = _temperature(params, x_qual)
        return _linear(params, x_phys) / tau[:, None]
    raise ValueError(f"unknown gate kernel '{kind}'")


def mixture(weights: np.ndarray, expert_pred: np.ndarray) -> np.ndarray:
    """Soft mixture ``sum_k p_k yhat_k``, shape (n,)."""
    return np.einsum("nk,nk->n", weights, expert_pred)


def mixture_sigma(weights: np.ndarray, expert_pred: np.ndarray, resid_var: np.ndarray) -> np.ndarray:
    """Predictive std of the mixture: ``sqrt(sum_k p_k (s_k^2 + (yhat_k - yhat)^2))``."""
    mean = mixture(weights, expert_pred)
    var = np.einsum("nk,nk->n", weights, resid_var[None, :] + (expert_pred - mean[:, None]) ** 2)
    return np.sqrt(var)


def entropy(weights: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of gate weights."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(weights > 0, weights * np.log(weights), 0.0), axis=1)


# --------------------------------------------------------------- the gate
@dataclass
class Gate:
    """A fitted gate: its spec, forward kernel, parameters and input scalers."""

    spec: GateSpec
    kind: str
    params: dict[str, np.ndarray]
    scalers: dict[str, Standardizer]
    n_classes: int
    info: dict = field(default_factory=dict)

    def inputs(self, table: Mapping[str, np.ndarray],
               ablate: str | None = None) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        z = {name: self.scalers[name].transform(table[name]) for name in self.spec.inputs}
        if ablate in z:  # the block held at its training mean: what the gate does without that information
            z[ablate] = np.zeros_like(z[ablate])
        x_all = np.concatenate([z[name] for name in self.spec.inputs], axis=1)
        return z.get("physical"), x_all, z.get("quality")

    def weights(self, table: Mapping[str, np.ndarray], ablate: str | None = None) -> np.ndarray:
        """Gate weights (n, K) for a table with ``quality`` / ``physical`` arrays.

        ``ablate`` names an input block (``quality`` or ``physical``) to hold
        at its training mean for every row (an ablation: no information).
        """
        return softmax(gate_logits(self.kind, self.params, *self.inputs(table, ablate)), axis=1)

    # storage as plain arrays (zarr), never pickle
    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"param_{k}": np.asarray(v, np.float64) for k, v in self.params.items()}
        for name, sc in self.scalers.items():
            for attr in ("log", "median", "mean", "scale"):
                out[f"scaler_{name}_{attr}"] = np.asarray(getattr(sc, attr))
        return out

    @classmethod
    def from_arrays(cls, spec: GateSpec, kind: str, n_classes: int, arrays: Mapping[str, np.ndarray],
                    info: dict | None = None) -> Gate:
        params = {k[len("param_"):]: np.asarray(v, np.float64) for k, v in arrays.items() if k.startswith("param_")}
        scalers = {name: Standardizer(np.asarray(arrays[f"scaler_{name}_log"], bool),
                                      *(np.asarray(arrays[f"scaler_{name}_{a}"], np.float64)
                                        for a in ("median", "mean", "scale")))
                   for name in spec.inputs}
        return cls(spec, kind, params, scalers, n_classes, dict(info or {}))


# ------------------------------------------------------------- training
def _logreg(x: np.ndarray, labels: np.ndarray, n_classes: int, c: float, seed: int) -> dict[str, np.ndarray]:
    """Multinomial logistic regression; classes absent from ``labels`` get logit -30."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    w = np.zeros((n_classes, x.shape[1]))
    b = np.full(n_classes, -_BIG)
    if present.size == 1:
        b[present[0]] = 0.0
        return {"W": w, "b": b}
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, labels)
    coef, icpt = clf.coef_, clf.intercept_
    if present.size == 2:  # sklearn's binary form: one logit for the second class
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    w[present], b[present] = coef, icpt
    return {"W": w, "b": b}


def _softmax_grad(z: np.ndarray, pred: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """MSE of the mixture and its gradient w.r.t. the logits."""
    p = softmax(z, axis=1)
    yhat = mixture(p, pred)
    r = yhat - y
    n = y.shape[0]
    loss = float(r @ r) / n
    dz = (2.0 / n) * r[:, None] * p * (pred - yhat[:, None])
    return loss, dz


def _pack(params: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([params[k].ravel() for k in names])


def _unpack(theta: np.ndarray, like: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k in names:
        size = like[k].size
        out[k] = theta[i:i + size].reshape(like[k].shape)
        i += size
    return out


def mse_loss_grad(kind: str, params: dict[str, np.ndarray], trainable: list[str], x_phys, x_all, x_qual,
                  pred: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, dict[str, np.ndarray]]:
    """Loss ``mean((sum p yhat_k - y)^2) + l2 * sum ||W||^2`` and its gradient (by hand)."""
    grads: dict[str, np.ndarray] = {}
    if kind == "linear":
        z = _linear(params, x_all)
        loss, dz = _softmax_grad(z, pred, y)
        grads["W"], grads["b"] = dz.T @ x_all, dz.sum(0)
    elif kind == "mlp":
        z, acts = _mlp_forward(params, x_all)
        loss, dz = _softmax_grad(z, pred, y)
        n_layers = len(acts)
        delta = dz
        for i in range(n_layers - 1, -1, -1):
            grads[f"W{i}"] = delta.T @ acts[i]
            grads[f"b{i}"] = delta.sum(0)
            if i:
                delta = (delta @ params[f"W{i}"]) * (1.0 - acts[i] ** 2)
    elif kind == "temp":
        a = _linear(params, x_phys)
        tau, u = _temperature(params, x_qual)
        loss, dz = _softmax_grad(a / tau[:, None], pred, y)
        da = dz / tau[:, None]
        dtau = -np.sum(dz * a, axis=1) / tau**2
        du = dtau * expit(u)
        grads["W"], grads["b"] = da.T @ x_phys, da.sum(0)
        grads["c"], grads["d"] = x_qual.T @ du, np.array([du.sum()])
    else:
        raise ValueError(f"unknown gate kernel '{kind}'")
    for k in trainable:
        if k.startswith(("W", "c")):
            loss += l2 * float(np.sum(params[k] ** 2))
            grads[k] = grads[k] + 2.0 * l2 * params[k]
    return loss, {k: grads[k] for k in trainable}


def _train_mse(kind: str, params: dict[str, np.ndarray], trainable: list[str], inputs, pred, y, l2: float,
               max_iter: int) -> tuple[dict[str, np.ndarray], dict]:
    def fun(theta):
        cur = {**params, **_unpack(theta, params, trainable)}
        loss, g = mse_loss_grad(kind, cur, trainable, *inputs, pred, y, l2)
        return loss, _pack(g, trainable)

    res = minimize(fun, _pack(params, trainable), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    out = {**params, **_unpack(res.x, params, trainable)}
    return out, {"iterations": int(res.nit), "converged": bool(res.success), "train_loss": float(res.fun)}


def fit_gate(spec: GateSpec, table: Mapping[str, np.ndarray], labels: np.ndarray, pred: np.ndarray, y: np.ndarray,
             *, n_classes: int, l2: float = 1e-3, logreg_c: float = 1.0, max_iter: int = 500,
             seed: int = 0) -> Gate:
    """Fit one gate on the gate-training rows.

    Parameters
    ----------
    spec : GateSpec
    table : mapping
        ``quality`` (n, Dq) and ``physical`` (n, Dp) raw feature arrays.
    labels : ndarray of int, shape (n,)
        True class (bin of ``spec.family``) of each row, for classifying fits.
    pred : ndarray of shape (n, K)
        Predictions of the K experts the gate mixes, in class order.
    y : ndarray of shape (n,)
        True target, for the MSE fits.
    n_classes : int
    l2, logreg_c, max_iter, seed
        Regularisation of the MSE gates, inverse penalty of the classifiers,
        L-BFGS iterations, random initialisation of the MLP.
    """
    if pred.shape != (y.shape[0], n_classes):
        raise ValueError(f"expert predictions must have shape ({y.shape[0]}, {n_classes}), got {pred.shape}")
    scalers = {name: Standardizer.fit(table[name]) for name in spec.inputs}
    gate = Gate(spec, "linear", {}, scalers, n_classes)
    x_phys, x_all, x_qual = gate.inputs(table)
    inputs = (x_phys, x_all, x_qual)
    t = spec.training
    info: dict = {"training": t, "n_rows": int(y.shape[0])}
    if t == "logreg":
        gate.params = _logreg(x_all, labels, n_classes, logreg_c, seed)
    elif t == "mse_linear":
        start = _logreg(x_all, labels, n_classes, logreg_c, seed)  # warm start at the classifier
        gate.params, info["optimizer"] = _train_mse("linear", start, ["W", "b"], inputs, pred, y, l2, max_iter)
    elif t == "logitadd":
        dp = x_phys.shape[1]
        a = _logreg(x_phys, labels, n_classes, logreg_c, seed)
        start = {"W": np.hstack([a["W"], np.zeros((n_classes, x_all.shape[1] - dp))]), "b": a["b"].copy()}
        gate.params, info["optimizer"] = _train_mse("linear", start, ["W", "b"], inputs, pred, y, l2, max_iter)
    elif t == "poe":
        a = _logreg(x_phys, labels, n_classes, logreg_c, seed)
        b = _logreg(x_qual, labels, n_classes, logreg_c, seed)
        # softmax(a) * softmax(b) / Z == softmax(a + b): one linear gate on [phys, quality]
        gate.params = {"W": np.hstack([a["W"], b["W"]]), "b": np.maximum(a["b"] + b["b"], -_BIG)}
    elif t == "temp":
        a = _logreg(x_phys, labels, n_classes, logreg_c, seed)
        start = {**a, "c": np.zeros(x_qual.shape[1]), "d": np.array([-2.0])}
        gate.kind = "temp"
        gate.params, info["optimizer"] = _train_mse("temp", start, ["c", "d"], inputs, pred, y, l2, max_iter)
    elif t == "mse_mlp":
        rng = np.random.default_rng(seed)
        sizes = [x_all.shape[1], *spec.hidden, n_classes]
        start = {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            start[f"W{i}"] = rng.normal(0.0, 1.0 / np.sqrt(fan_in), (fan_out, fan_in))
            start[f"b{i}"] = np.zeros(fan_out)
        gate.kind = "mlp"
        names = list(start)
        gate.params, info["optimizer"] = _train_mse("mlp", start, names, inputs, pred, y, l2, max_iter)
    else:
        raise ValueError(f"unknown gate training '{t}'")
    gate.info = info
    return gate

