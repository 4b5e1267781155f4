"""Stage 8, study: a grid of pretext x trunk x width x seed, run and reported.

The paper is a study (Table 1, Figs. 2-8); this stage runs one from a spec
and draws it. Data flow::

    gin/study/*.gin -> spec.make_spec -> spec.expand -> jobs (train -> export -> probe)
        -> runner.run_study (executors: local subprocesses, slurm via submitit)
        -> cells' probe/results.jsonl -> collect -> report (tables, figures, findings)

Contracts:
  * ``spec``: ``make_spec(name, axes=..., probes=..., ...) -> Spec`` (checked
    before anything runs), ``expand(spec) -> [Job]`` in dependency order,
    each with a fingerprint of its gin text and its dependencies';
  * ``runner``: ``run_study(study_dir, spec, jobs, executor) -> Summary``,
    resumable (done jobs with matching fingerprints are skipped), locked (one
    runner per directory), failures reported and contained; ``dry_run``;
  * ``worker``: ``run_chain(study_dir, job_ids)`` runs jobs in one process
    through the ``revisit-*`` mains; states in ``jobs/<id>/status.json``;
  * ``executors`` / ``slurm``: where chains run;
  * ``collect``: study directory -> records (one per probe result);
  * ``stats``, ``figures``, ``report``: records -> ``report/README.md`` with
    the Table 1 layout, Figs. 2, 3, 4, 5, 7, 8 analogues and findings.

Only ``worker`` imports TensorFlow (lazily, in the job process); the runner
drives the binaries through their gin interface.
"""
