"""One module per node family; each exports the io.ComfyNode classes it defines in NODES."""
