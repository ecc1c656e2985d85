"""Stage 3, growth: backpropagation statistics, the paper's closed forms, growth methods, amplitude
search, the where/how-many policy and model surgery. Imports only ``model`` (and the common modules)."""
