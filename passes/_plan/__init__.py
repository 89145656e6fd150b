"""The planners' private helpers: compression units and their costs (``units``), measured
sensitivities (``measure``), the budgeted search (``search``) and the precision knapsack
(``precision``). Used by the ``plan`` and ``mixed-precision`` passes, the only passes that
compose other passes."""
