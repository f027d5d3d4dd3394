"""Export one client of a trained run: the library function behind ``collafuse export``."""
from __future__ import annotations

import os
import warnings

from .errors import ExportError


def export_client(run_dir: str, client: int, out_dir: str, config=None, *, overwrite: bool = False,
                  student: str | None = None):
    """Export client ``client`` of the run in ``run_dir`` (its EMA weights, its cut ratio;
    its own training images calibrate int8 and feed the quality gate). Returns an ExportResult.

    ``student``: a ``student_n{N}.json`` from ``collafuse distill`` for this client; the bundle then
    holds the few-step student and records its sampler ("distilled", N levels)."""
    from collafuse.checkpoint import load_run

    from .exporter import ExportConfig, export_bundle

    config = config or ExportConfig()

    run = load_run(run_dir, device="cpu")
    n = len(run.clients)
    if isinstance(client, bool) or not isinstance(client, int) or not (0 <= client < n):
        raise ExportError(f"client must be an index in [0, {n - 1}] for run {run_dir!r}, got {client!r}")
    if run.clients[client] is None:
        raise ExportError(f"{run_dir!r} is the client-train run of client {run.site['client_index']} and holds "
                          f"only that model; pass --client {run.site['client_index']}")
    images = labels = None
    classes = None
    conditional = getattr(run.clients[client].config, "num_class_embeds", None) is not None
    if config.precision != "fp32" or conditional:
        from collafuse.data import load_dataset, partition
        from collafuse.errors import DataError

        try:
            ds = load_dataset(run.config.data.source, run.config.data.image_size)
            part = partition(ds, run.config.data)[client]
        except (DataError, OSError) as e:
            if config.precision != "fp32":  # int8/fp16 calibrate and gate on the client's images
                raise
            # the classes this client knows only set the device's default labels: go on without them
            warnings.warn(f"the training data of run {run_dir!r} is not readable here ({e}); the bundle will not "
                          f"record the client's classes (devices then default to labels 0, 1, 2, …)")
        else:
            if config.precision != "fp32":
                images, labels = part.train_images, part.train_labels
            classes = list(part.classes) if conditional else None
    # the run's folder name, never the exporting machine's absolute path
    source = {"run": os.path.basename(os.path.normpath(os.path.abspath(run_dir))), "client": client, "step": run.step}
    if run.site is not None:
        source["site_of"] = {"server": run.site.get("server"), "server_model_version": run.model_version}
    model, sampler = run.clients[client], None
    if student is not None:
        from collafuse.distill import load_student
        from collafuse.errors import ConfigError
        from collafuse_edge.bundle import sampler_section

        st = load_student(student, run)  # a wrong or damaged student is bad input (ConfigError, exit 2)
        if st.client != client:
            raise ConfigError(f"student {student!r} was distilled for client {st.client}, not client {client}; "
                              f"pass --client {st.client} or that client's student")
        model = st.model
        teacher = st.meta.get("teacher") or {}  # no paths of the exporting machine in the manifest
        sampler = sampler_section(st.steps, st.client_levels, method=st.meta.get("method"),
                                  teacher={k: teacher.get(k) for k in ("step", "checkpoint", "sampler")},
                                  student_sha256=st.meta.get("weights_sha256"))
        source["student"] = os.path.basename(student)
    return export_bundle(model, run.schedule, run.config.cut_ratios[client], out_dir,
                         config=config, calibration_images=images, calibration_labels=labels,
                         source=source, overwrite=overwrite, sampler=sampler, client_classes=classes)


__all__ = ["export_client"]
