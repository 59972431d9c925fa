"""Everything MLflow: where the store is (:mod:`.store`), what a run logs (:mod:`.runs`), the
sweep's parent run (:mod:`.parent`), the driver's callback that writes every trial's run
(:mod:`.callback`), and finding a sweep's runs again (:mod:`.lookup`).

Modules import MLflow themselves; importing this package imports nothing heavy."""
