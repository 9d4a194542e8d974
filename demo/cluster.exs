# The Elixir node of the demo (ex@gamma): finds the two Erlang nodes and the
# Go node by their tailnet hostnames, shows the cluster working over the
# tailnet, and measures a ping, a call to the Go node and a 1 MiB message
# round trip. Run by demo/run.sh.
peers = [:app@alpha, :app@beta]

IO.puts("   #{node()} is tailnet device #{:tailscale_helper.hostname()}; nodes on alpha's EPMD: #{inspect(elem(:net_adm.names(:alpha), 1))}")

for peer <- peers do
  {us, true} = :timer.tc(fn -> Node.connect(peer) end)
  IO.puts("   Node.connect(#{inspect(peer)}) -> true in #{div(us, 1000)} ms")
end

IO.puts("   Node.list() = #{inspect(Enum.sort(Node.list()))}")

for peer <- peers do
  host = :erpc.call(peer, :tailscale_helper, :hostname, [])
  release = :erpc.call(peer, :erlang, :system_info, [:otp_release])
  IO.puts("   :erpc.call(#{inspect(peer)}, ...) ran on tailnet host #{host}, OTP #{release}")
end

# alpha and beta see each other too: a name registered on alpha is seen
# on beta through global, over the tailnet.
:yes = :erpc.call(:app@alpha, :global, :register_name, [:demo_registry, :erpc.call(:app@alpha, :erlang, :whereis, [:init])])
:ok = :global.sync()
IO.puts("   :global.whereis_name(:demo_registry) from beta -> #{inspect(:erpc.call(:app@beta, :global, :whereis_name, [:demo_registry]))} (alpha's init)")

rtts = for _ <- 1..200, do: elem(:timer.tc(fn -> :pong = :net_adm.ping(:app@alpha) end), 0)
median = Enum.at(Enum.sort(rtts), 100)
IO.puts("   net_adm:ping(app@alpha) round trip: median #{median} us over 200")

mib = :crypto.strong_rand_bytes(1024 * 1024)
{us, _} = :timer.tc(fn -> for _ <- 1..20, do: ^mib = :erpc.call(:app@beta, :erlang, :hd, [[mib]]) end)
IO.puts("   1 MiB message to app@beta and back, 20 times: #{Float.round(20 * 2 * 1.048576 / (us / 1.0e6), 1)} MB/s (#{div(us, 20_000)} ms per round trip)")

# The Go node (ergo on tailnet device delta): the Erlang nodes call its
# gen server by hostname, and it tells each who it is, from the tailnet.
go_node = :greeter@delta
for peer <- peers do
  reply = :erpc.call(peer, :gen_server, :call, [{:greeter, go_node}, {:hello, Atom.to_string(peer)}])
  IO.puts("   #{peer} calls {greeter, #{go_node}}: #{inspect(reply)}")
end

:pong = :net_adm.ping(go_node)
rtts = for _ <- 1..200, do: elem(:timer.tc(fn -> :gen_server.call({:greeter, go_node}, {:hello, "gamma"}) end), 0)
IO.puts("   gen_server:call to the Go node: median #{Enum.at(Enum.sort(rtts), 100)} us over 200; Node.list() = #{inspect(Enum.sort(Node.list()))}")
