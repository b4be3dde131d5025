"""Federation tooling for phase 1 (Fed-BioMed 6.4.1).

* :mod:`.strategy` — node selection (at most k nodes per round) and aggregation weights;
* :mod:`.fedbiomed_compat` — every use of a Fed-BioMed internal (one place, checked by a test);
* :mod:`.researcher` — researcher-side helpers used by ``train.py``; :mod:`.export` — breakpoint -> factory file;
* :mod:`.options` — the options of ``train.py`` (researcher side) and ``save_global_model.py``, flags generated
  from their fields;
* :mod:`.secagg` — secure aggregation: how a node encodes its round update and how the researcher
  decodes the masked sum (``train.py --secagg``); :mod:`.experiment` — the Experiment that does it;
* :mod:`.local` — a local federation (N nodes + researcher component on one machine) for demos,
  tests and benchmarks (``python -m robustmedseg.federation.local --help``);
* :mod:`.inprocess` — one node round in this process, without gRPC (tests, benchmarks).

Importing this package does not import ``fedbiomed.researcher`` (which creates a researcher
component as a side effect): modules that need it import it lazily.
"""
