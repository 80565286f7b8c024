async def process(context):
    # This uses our injected ActorContext
    input_val = context.get_input("value")
    
    # Send intermediate output (our feature)
    await context.send_output("status", "processing")
    
    # Send final output
    await context.send_output("result", input_val * 2)
    
    return context.get_outputs()
