"""graphc's own fusion rules (onnxscript rewriter rules) for graph shapes onnxscript's
``ort_fusions`` miss, and the miss accounting of the ``fuse-ort`` pass."""
