"""Station side: the inspection daemon and its tools. Runs model bundles; never imports `trainer`."""
