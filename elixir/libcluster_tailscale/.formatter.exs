[
  inputs: ["{mix,.formatter}.exs", "test_cluster.exs", "{lib,test}/**/*.{ex,exs}"]
]
