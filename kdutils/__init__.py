"""kdutils: the helper package of the kd-without-ce notebooks (feature KD without cross-entropy).

The course's API -- what the notebooks call, by the notebook that teaches it (everything else is plumbing):

    notebook.setup                         every notebook: parameters -> config, run_dir, data_root, device, seed
    rundir.series_data                     every notebook: the series' dataset (train split minus validation)
    data.load_dataset, data.batches        1, 4: datasets as uint8 tensors; device-resident shuffled batches
    models.build_model                     1, 4: the paper's models and the CPU-scale pair
    train.fit, train.load_model            1 (and 2-6): train with a resumable checkpoint; load a trained model
    layers.layer_table                     1, 4: the generalized layers of a model
    kq.layer_analysis, kq.quality_table    2: per-layer geometry (separation, information, efficiency)
    kq.knowledge_quality                   3: Q = S + sqrt(I * E) of one layer's features
    kq.layer_qualities, kq.select_layers   3: Q per layer; the top-k teacher layers
    distill.distill_loss                   4: one CE-free step written out (the head sees CE, the backbone does not)
    distill.distill, distill.REGISTRY      4, 5: train a student with any of the methods
    distill.gradient_flow                  4: which loss term reaches which parameters
    results.summarize_runs, results.verdicts   5: results.json and what it says
    result_plots.plot_result_panel         5: the paper's result figure with its ARI
    validation.swap_sweep, validation.rank_correlations, validation.predictor_differences, validation.compare_selections   6: does KQ pick well?

Modules, in the order the data flows through them: data and datasets (arrays, batches) -> models, layers (networks,
generalized layers, hooks) -> precision, checkpoints, train (training) -> geometry, kq (knowledge quality) ->
feature_maps, feature_losses, teacher_cache, monitor, distill (distillation) -> stats, results, plots, result_plots,
report, validation (what a run shows) -> presets, runtime, rundir, checks, notebook, pipeline, sweep_tasks, sweep
(running the series: settings, run directories, the papermill runner, the Ray grid).
"""
__version__ = "0.1.0"
