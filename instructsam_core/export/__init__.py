"""ONNX export of SAM3's vision encoder and the InstructSAM head, and the parity check.

    from instructsam_core.export.onnx_export import export_onnx
    from instructsam_core.export.onnxruntime_runner import OnnxRuntimeRunner
    from instructsam_core.export.parity import check_parity, parity_cases

    manifest = export_onnx(model, "out/onnx", source="tiny")    # vision.onnx, head.onnx, manifest.json
    report = check_parity(OnnxRuntimeRunner("out/onnx"), parity_cases(model, manifest))
    print(report.table())

`graphs` defines what is exported, `onnx_export` writes it, `manifest` describes it, and
`parity` compares any runner of the graphs (`onnxruntime_runner` here, TensorRT engines in
`instructsam_core.tensorrt.runtime`) with the PyTorch path; `commands` holds the CLI.
onnx, onnxscript and onnxruntime come with the `export` extra. Nothing is imported here,
so that the CLI starts without loading torch and transformers.
"""
