# fph-bench: end-to-end reclaim throughput, latency and CPU of the real fphd
# and fph-guest binaries against the raw fallocate limit (see fph_bench.cpp).
add_executable(fph-bench
  ${CMAKE_CURRENT_LIST_DIR}/fph_bench.cpp
  ${CMAKE_CURRENT_LIST_DIR}/options.cpp
  ${CMAKE_CURRENT_LIST_DIR}/processes.cpp
  ${CMAKE_CURRENT_LIST_DIR}/measure.cpp
  ${CMAKE_CURRENT_LIST_DIR}/hugepages.cpp
  ${CMAKE_CURRENT_LIST_DIR}/scenarios.cpp
  ${CMAKE_CURRENT_LIST_DIR}/raw_limit.cpp
  ${CMAKE_CURRENT_LIST_DIR}/report.cpp
  ${CMAKE_CURRENT_LIST_DIR}/wakeup_floor.cpp
  ${CMAKE_CURRENT_LIST_DIR}/scale.cpp
  ${CMAKE_CURRENT_LIST_DIR}/guest_fleet.cpp
  ${CMAKE_CURRENT_LIST_DIR}/backoff.cpp)
target_link_libraries(fph-bench PRIVATE fph::probe benchmark::benchmark nlohmann_json::nlohmann_json Threads::Threads)
target_compile_definitions(fph-bench PRIVATE
  FPH_FPHD_PATH="$<TARGET_FILE:fphd>" FPH_GUEST_PATH="$<TARGET_FILE:fph-guest>")
add_dependencies(fph-bench fphd fph-guest)

if(FPH_BUILD_TESTS)
  # Smoke test so the bench cannot rot: a tiny run that must reclaim what the
  # guests freed (fph-bench exits 1 otherwise). No timing is asserted.
  add_test(NAME bench_smoke
           COMMAND fph-bench --quick --guests=1,4 --backing=shmem --repetitions=1)
  set_tests_properties(bench_smoke PROPERTIES LABELS bench RUN_SERIAL TRUE TIMEOUT 300)
  # The scale mode, tiny: one fphd, 1 then 4 small guests, a 1 s idle window.
  add_test(NAME bench_scale_smoke
           COMMAND fph-bench --scale=1,4 --scale-idle-s=1)
  set_tests_properties(bench_scale_smoke PROPERTIES LABELS bench RUN_SERIAL TRUE TIMEOUT 120)
endif()

# fph-migration-bench: fphd's share of live-migration downtime (GET_VRING_BASE
# drain with requests in flight, SAVE, LOAD, blob size) over repeated
# migrations between two real fphd processes, and reclaim throughput with
# dirty logging on vs off (see migration_bench.cpp, docs/bench-migration.md).
add_executable(fph-migration-bench ${CMAKE_CURRENT_LIST_DIR}/migration_bench.cpp)
target_link_libraries(fph-migration-bench PRIVATE fph::guest fph::proto nlohmann_json::nlohmann_json fmt::fmt
                      Threads::Threads)
target_compile_definitions(fph-migration-bench PRIVATE FPH_FPHD_PATH="$<TARGET_FILE:fphd>")
add_dependencies(fph-migration-bench fphd)

if(FPH_BUILD_TESTS)
  # Every step and every check of the bench, small: it exits 1 on a failed
  # check, a nack or a mismatch. No timing is asserted.
  add_test(NAME migration_bench_smoke COMMAND fph-migration-bench --quick)
  set_tests_properties(migration_bench_smoke PROPERTIES LABELS bench RUN_SERIAL TRUE TIMEOUT 300)
endif()
